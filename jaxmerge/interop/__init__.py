"""Files of other libraries: Hugging Face ViT checkpoints (`hf`), big_vision `.npz` checkpoints
(`bigvision`) and PEFT adapter folders (`peft`)."""
