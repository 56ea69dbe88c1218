"""The organism: a small LLaVA-style video LLM from real pretrained parts (DINOv2 ViT-S/14, SmolLM2-135M-Instruct)
with a trained connector, on which token-reduction methods' accuracy is measured (docs/organism.md)."""
