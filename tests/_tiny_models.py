"""Model overrides that keep training tests small: ``create_model(name, **TINY_2D)`` for hmedn_2d and
``**TINY_3D`` for hmedn_3d_l2 (dropout off, so runs are deterministic given their seeds)."""

TINY_2D = dict(widths=(8, 16, 32, 32), growth_rates=8, num_layers=2, hr_stage=2, hr_channels=8, hr_blocks=2,
               dropout=0.0)
TINY_3D = dict(widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_channels=8, hr_blocks=2, dropout=0.0)
