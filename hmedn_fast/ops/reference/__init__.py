"""Pure-PyTorch reference implementations: the truth every fast backend is tested against."""
