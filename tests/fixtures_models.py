"""Real adapters made by PEFT/diffusers on tiny models (placeholder)."""
