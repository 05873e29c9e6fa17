"""The training progress on stderr, by tqdm: a live bar on a terminal (steps/s, ETA, the loss),
else one line every 10% of the steps, so that logs stay readable and stdout stays clean."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """train's progress(done, steps, loss) callback; close() ends the bar."""

    def __init__(self, total: int, stream=None):
        # sys.stderr looked up now, not at import: callers (and pytest) may have replaced it
        self.stream = sys.stderr if stream is None else stream
        self.total = total
        self.start = time.perf_counter()
        self.next_line = 0
        self.bar = tqdm(total=total, unit="step", file=self.stream, dynamic_ncols=True,
                        smoothing=0.1) if self.stream.isatty() else None

    def __call__(self, done: int, total: int, loss: float) -> None:
        if done == 0:  # the loop starts: time the steps alone, not the data or the build before
            self.start = time.perf_counter()
            if self.bar is not None:
                self.bar.reset(total)
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(done - self.bar.n)
        elif done >= self.next_line or done == total:
            self.next_line = done + max(1, total // 10)
            meter = tqdm.format_meter(done, total, time.perf_counter() - self.start, unit="step",
                                      ascii=True, postfix=f"loss={loss:.4f}")
            print(meter, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
