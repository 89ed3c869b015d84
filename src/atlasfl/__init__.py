"""ATLAS: multi-task federated LoRA fine-tuning."""
__version__ = "0.1.0"
