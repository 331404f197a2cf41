"""`python -m slsam_hf OUTPUT_DIR`: draw the selection picture of a finished run from its `selection_history.json`
and print which blocks the bandit favoured, without rerunning anything."""

import argparse
import json
import os

from .history import HISTORY_JSON, HISTORY_PNG, mean_active_param_ratio, most_selected_rows, plot_selection


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slsam_hf", description=__doc__)
    parser.add_argument("output_dir", help=f"a training run's output_dir (holding {HISTORY_JSON})")
    parser.add_argument("--output", help=f"where to write the picture (default: OUTPUT_DIR/{HISTORY_PNG})")
    parser.add_argument("--top", type=int, default=5, help="blocks to list, most selected first")
    args = parser.parse_args(argv)
    with open(os.path.join(args.output_dir, HISTORY_JSON)) as f:
        state = json.load(f)
    if not state["steps"]:
        parser.error(f"{HISTORY_JSON} in {args.output_dir} records no step")
    output = args.output or os.path.join(args.output_dir, HISTORY_PNG)
    print(f"{len(state['arm_names'])} arms, {sum(state['window_steps'])} steps, "
          f"active-parameter ratio {mean_active_param_ratio(state):.1%}")
    for row, share in most_selected_rows(state, args.top):
        print(f"  {row}: its arms selected in {share:.1%} of steps")
    if plot_selection(state, output):
        print(f"wrote {output}")
    else:
        print("matplotlib is not installed: no picture (pip install matplotlib)")


if __name__ == "__main__":
    main()
