"""Cost of S4ND against what it replaces: timing and memory ratios (`benchmark`), multiply-add counts with
fvcore (`flops`), and a quick build-and-run check (`smoke`). Import the submodule you need: `flops` needs fvcore."""
