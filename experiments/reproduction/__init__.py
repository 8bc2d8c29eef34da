"""The pieces of `experiments/reproduce.py`: the paper's comparisons, scaled down, on one GPU.

- `settings`: every size and option (`Settings`, the GPU and `--tiny` presets) and the time plan;
- `corpus`: Python source and documentation found on the machine, and synthetic retrieval documents;
- `stages`: prepare, pretrain, extend, eval, each resumable and skipped when finished for the same settings;
- `tasks`: the retrieval prompts of the evaluation, built from the seed;
- `report`: the comparison tables, the paper's expectations checked, JSON and plots;
- `runs`: saved runs side by side (`replicas`, `compare`); `near`: the near-question probe; `distance`: answers by
  where the needles lie.
"""
