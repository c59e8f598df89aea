"""lol-rl: Advantage-Leftover Lunch RL (Baheti et al., ICLR 2024) and its baselines."""

__version__ = "0.1.0"
