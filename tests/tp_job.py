"""Run under ``torchrun --nproc-per-node N`` by tests/test_tensor_parallel.py: judge each case of a JSON spec
with a tensor-parallel Rank1 (the leader judges, the others follow) and write the leader's judgements.

spec: {"out": path, "cases": [{"model": dir, "options": {...}, "pairs": [[q, p], ...],
       "plant": {"lengths": {prompt tokens: reasoning tokens}, "never": [prompt tokens]} | null}],
       "fail": {"rank": r, "step": k} | null}
"fail" makes process r raise in its k-th engine step (a rank that fails must take the job down).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from plant import plant_lengths  # noqa: E402

from rank1_hf import Rank1  # noqa: E402
from rank1_hf.engine.continuous import ContinuousEngine  # noqa: E402


def inject_failure(rank: int, step: int) -> None:
    import torch.distributed as dist

    if dist.get_rank() != rank:
        return
    original, count = ContinuousEngine.step, [0]

    def failing(self, waiting):
        count[0] += 1
        if count[0] == step:
            raise RuntimeError("planted failure")
        return original(self, waiting)

    ContinuousEngine.step = failing


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = []
    for case in spec["cases"]:
        ranker = Rank1(case["model"], tensor_parallel=True, **case["options"])
        if spec.get("fail") and not results:
            inject_failure(**spec["fail"])
        plant = case.get("plant")
        if plant:
            plant_lengths(ranker.model, ranker.tokenizer, {int(k): v for k, v in plant["lengths"].items()},
                          never=set(plant["never"]))
        if ranker.is_follower:
            ranker.follow()
            results.append(None)
            continue
        with ranker:
            judged = ranker.judge_with_stats([tuple(p) for p in case["pairs"]])
        results.append({"judgements": [[j.outcome, j.reasoning, j.reasoning_tokens, j.score] for j in judged.judgements],
                        "preemptions": judged.stats.preemptions,
                        "kv_tokens": ranker.core.settings.kv_tokens, "peak_rows": judged.stats.peak_rows})
    if not ranker.is_follower:
        Path(spec["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
