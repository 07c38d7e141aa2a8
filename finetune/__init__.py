"""Fine-tuning stages for DeepSeek-V3-architecture models: sft, dpo, cpt, chat, evaluate, demo (see cli.STAGES)."""
