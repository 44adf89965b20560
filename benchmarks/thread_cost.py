"""What a second thread costs torch on a CPU, without rank1-hf (why the waiting caller steps the engine).

    python benchmarks/thread_cost.py            # as users run it
    OMP_WAIT_POLICY=PASSIVE python benchmarks/thread_cost.py

Eight Linear(512, 512) layers on a (16, 512) input, 3,000 times under inference_mode with torch's default
threads, each case in a fresh process: (a) in the main thread; (b) in a second thread, the main thread
having run no torch op; (c) in a second thread after the main thread ran torch ops (it then has an OpenMP
team of its own: the case of an engine thread beside a caller that loaded the model). Printed: seconds
per case (the fastest of --rounds) and the ratios to (a). libgomp's waiting threads spin only briefly once
more OpenMP threads exist than cores, which is the likely reason (c) is slower on a 2-core machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

CASE = textwrap.dedent(
    """
    import sys, threading, time, torch
    torch.manual_seed(0)
    layers = [torch.nn.Linear(512, 512) for _ in range(8)]
    x = torch.randn(16, 512)
    def work(n):
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(n):
                h = x
                for layer in layers:
                    h = layer(h)
            return time.perf_counter() - start
    case = sys.argv[1]
    if case == "main":
        work(200)
        print(work(3000))
    else:
        if case == "thread-after-main":
            work(200)
        box = []
        def run():
            work(200)
            box.append(work(3000))
        t = threading.Thread(target=run)
        t.start()
        t.join()
        print(box[0])
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cases = ["main", "thread", "thread-after-main"]
    best = {case: float("inf") for case in cases}
    for _ in range(args.rounds):  # alternate the cases, so they see a similar machine
        for case in cases:
            out = subprocess.run([sys.executable, "-c", CASE, case], check=True, capture_output=True, text=True)
            best[case] = min(best[case], float(out.stdout))
    for case in cases:
        print(f"{case:>18}: {best[case]:.2f} s  ({best[case] / best['main']:.2f}x main)")


if __name__ == "__main__":
    main()
