"""Quality evaluation of generated videos: the paper's segment CLIP score and VBench-style
subject/background consistency, with every protocol choice written into the report.

    python -m eval.evaluate --videos videos/interactive --prompts ../shared/data/interactive_benchmark.jsonl \
        --config_path configs/interactive_inference.yaml
    python -m eval.compare --config_path configs/tiny_interactive.yaml --out eval_runs/tiny

See docs/evaluation.md for the protocol and what it can and cannot reproduce of the paper.
"""
