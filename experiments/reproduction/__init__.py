"""The pieces of `experiments/reproduce.py`: the paper's comparisons, scaled down, on one GPU.

- `settings`: every size and option (`Settings`, the GPU and `--tiny` presets) and the time plan;
- `corpus`: Python source and documentation found on the machine, and synthetic retrieval documents;
- `stages`: prepare, pretrain, extend, eval, each resumable and skipped when finished for the same settings;
- `report`: the comparison tables, the paper's expectations checked, JSON and plots.
"""
