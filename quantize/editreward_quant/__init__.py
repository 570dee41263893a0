"""Quantization of EditReward: schemes as versioned dataclass configs, dispatched by name."""
