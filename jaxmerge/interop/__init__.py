"""Files of other libraries: Hugging Face ViT checkpoints (`hf`), big_vision `.npz` checkpoints
(`bigvision`), PEFT adapter folders (`peft`) and the adapters of JAX LoRA libraries, qwix and
lorax (`jax_lora`)."""
