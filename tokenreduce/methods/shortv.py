"""ShortV (Yuan et al., 2025, arXiv 2504.00502): freeze visual tokens in the LLM layers that barely
change the output, found by a calibration of each layer's contribution."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..calibration import CalibrationRun
from ..context import MethodContext
from ..profiles import (
    check_finite_output,
    check_profile_depth,
    check_samples,
    finite_numbers,
    load_profile,
    profile_error,
    profile_source,
)
from .base import VisualMethod
from .options import Layers, Number, option

PROFILE_VERSION = 1


@dataclass
class ShortV(VisualMethod):
    """In the chosen layers, visual tokens are frozen: they get no query, attention output or MLP
    (their rows are not computed) and pass through unchanged, while their hidden states still supply
    keys and values to the text. The layers come from a calibration profile (the ``frozen_fraction``
    of layers with the lowest Layer Contribution; the paper freezes 19 of 32, about 0.6) or are
    given directly as ``layers``.

    Layer Contribution (:meth:`calibrate`): for each layer, the KL divergence of the last token's
    next-token distribution when that layer's update to the visual tokens is zeroed (exactly what
    freezing that single layer does), averaged over the calibration samples.

    Deviations: the query projection still runs on frozen rows (see ``engine.freeze``); batches
    of any size; the visual tokens are found from the prompt's layout (official: env-var layer list,
    hard-coded image offset, batch 1). Freezing acts in prefill; generated tokens are text.
    """

    name: ClassVar[str] = "shortv"
    description: ClassVar[str] = "visual tokens skip the least useful LLM layers, found by calibration (ShortV)"
    stages: ClassVar[tuple[str, ...]] = ("freeze",)

    profile: dict | str | None = None  # checked by validate (schema, finite values) and check_model (depth)
    frozen_fraction: float = option(0.6, Number(0, 1))
    layers: tuple[int, ...] | None = option(None, Layers(none=True))

    def validate(self) -> None:
        if self.profile is not None:
            self.profile_source = profile_source(self.profile)
            self.profile = load_profile(self.profile, self.name)
            contribution = self.profile.get("layer_contribution")
            if not finite_numbers(contribution):
                raise profile_error(self.profile_source, "layer_contribution", "must be a list of finite numbers "
                                    "(one per LLM layer)", contribution)
            if len(contribution) != self.profile["num_layers"]:
                raise profile_error(self.profile_source, "layer_contribution", f"must hold one number per layer "
                                    f"(num_layers = {self.profile['num_layers']}), not {len(contribution)}",
                                    contribution)

    def act_layers(self, num_layers: int) -> set[int]:
        return set()

    def frozen_layers(self, num_layers: int) -> list[int]:
        """The layers whose visual rows are frozen, lowest contribution first."""
        if self.layers is not None:
            return sorted(self.layers)
        if self.profile is None:
            raise ValueError("shortv needs a calibration profile (tokenreduce.calibrate(model, 'shortv', samples) "
                             "or 'tokenreduce calibrate shortv ...') or explicit layers=(...)")
        contribution = self.profile["layer_contribution"]
        count = round(self.frozen_fraction * num_layers)
        return sorted(sorted(range(num_layers), key=lambda i: (contribution[i], i))[:count])

    def check_model(self, num_layers: int) -> None:
        super().check_model(num_layers)
        if self.profile is not None and self.layers is None:
            check_profile_depth(self.profile, self.profile_source, self.name, num_layers)
        self.frozen_layers(num_layers)  # a layers-less, profile-less shortv says what it needs

    def setup(self, ctx: MethodContext) -> None:
        arch = ctx.architecture
        if self.profile is not None and self.layers is None and self.profile.get("architecture") != arch:
            raise ValueError(f"shortv: {self.profile_source} was calibrated on {self.profile.get('architecture')}, "
                             f"not {arch}; calibrate this model")
        layers = self.frozen_layers(ctx.num_layers)
        if layers:
            ctx.freeze(set(layers))

    @classmethod
    def calibrate(cls, model: Any, samples: Iterable[dict[str, Any]], *, run: CalibrationRun, progress: bool = True,
                  **options: Any) -> dict[str, Any]:
        """Layer Contribution of every LLM layer for visual tokens, averaged over ``samples`` (dicts of
        model inputs holding images or videos, e.g. a processor's output), as a profile dict."""
        import torch
        from tqdm.auto import tqdm

        if options:
            raise TypeError(f"shortv calibration takes no options {sorted(options)}")
        samples = check_samples(samples, cls.name)
        num_layers = run.num_layers()
        total = torch.zeros(num_layers, dtype=torch.float64)
        bar = tqdm(total=len(samples) * (num_layers + 1), desc="shortv calibration", disable=not progress)
        with torch.no_grad():
            for index, sample in enumerate(samples):
                dense = _last_log_probs(model, sample)
                check_finite_output(dense, cls.name, index, "next-token log-probabilities")
                bar.update()
                for layer in range(num_layers):
                    with run.patched(cls(layers=(layer,))) as stats:
                        frozen = _last_log_probs(model, sample)
                        if stats().visual_tokens_in[0] == 0:
                            raise ValueError(f"shortv calibration sample {index} has no image or video tokens")
                        check_finite_output(frozen, cls.name, index, f"log-probabilities with layer {layer} frozen")
                    # KL(dense || frozen) of the last token's next-token distribution, per sample
                    kl = (dense.exp() * (dense - frozen)).sum(dim=-1).mean()
                    total[layer] += float(kl)
                    bar.update()
        bar.close()
        return {"method": cls.name, "version": PROFILE_VERSION, "architecture": run.architecture,
                "model_type": getattr(model.config, "model_type", None), "num_layers": num_layers,
                "samples": len(samples), "layer_contribution": (total / len(samples)).tolist()}


def _last_log_probs(model: Any, sample: dict[str, Any]):
    logits = model(**sample).logits[:, -1].float()
    return logits.log_softmax(dim=-1)
