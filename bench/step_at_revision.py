"""The Wiki-shaped fused fp32 training step of an OLDER revision of this project, timed side by side with today's.

bench_train_step.py's ``fused_fp32_today`` provider rebuilds the step "as it was" by switching today's features
off (the basis cache, the fused dropout, the native epilogues); kernels improved since (the Chebyshev column
tiles, the gathers' prefetch) still speed it up, so it understates the distance to the code an issue measured.
This module runs the step of the code itself: a git worktree of ``rev`` (detached, under the system temp
folder), its own native library built there, and a child process that builds the same model on the same data
(the recipe of bench_train_step.train_step: random graph, bags of words, images, pairs and seeds) with that
revision's scanet and times one step each time it is asked. The child answers with the step's seconds
(perf_counter around the step, as interleaved() times the others), so pipe latency is not counted.

    with RevisionStep("a2adf9b") as step:   # the code when the bf16 issue was filed
        seconds = step()                     # one training step of that revision (the child's own timing)

Used by ``python bench/bench_train_step.py --baseline-rev REV``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The child: the step of bench_train_step.train_step("fused_fp32_today") written against the old API
# (SCANet(V, D, L, ModelConfig, fused=True), model(bow, image), scanet_loss -> (loss, parts)).
CHILD = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from scanet.config import ModelConfig
from scanet.data.graph import random_graph_laplacian
from scanet.loss import scanet_loss
from scanet.model import SCANet
from scanet import native
assert native.available(), native.unavailable_reason()
V, D, NT, B = 10_055, 4096, 2_866, 256
torch.manual_seed(0)
model = SCANet(V, D, random_graph_laplacian(V, k=8, seed=0), ModelConfig(dropout=0.2), fused=True).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.005, fused=True)
g = torch.Generator().manual_seed(0)
bows = torch.rand(NT, V, generator=g) * (torch.rand(NT, V, generator=g) < 0.02)
bows = bows / bows.sum(1, keepdim=True).clamp(min=1e-6)
images = torch.randn(NT, D, generator=torch.Generator().manual_seed(4)).relu()
g = torch.Generator().manual_seed(5)
ti, ii = torch.randint(0, NT, (B,), generator=g), torch.randint(0, NT, (B,), generator=g)
target = (torch.rand(B, generator=g) < 0.5).float()
def step():
    sim = model(bows[ti], images[ii])
    loss, _ = scanet_loss(sim, target, 0.6, 0.35)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
step()
print("ready", flush=True)
for line in sys.stdin:
    t = time.perf_counter(); step(); print(time.perf_counter() - t, flush=True)
"""


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{(done.stdout + done.stderr)[-2000:]}")


def worktree(rev: str) -> Path:
    """A detached worktree of ``rev`` with its native library built in place (made once, then reused)."""
    full = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True)
    if full.returncode != 0:
        raise ValueError(f"--baseline-rev {rev!r} is not a revision of {REPO}: {full.stderr.strip()}")
    sha = full.stdout.strip()
    path = Path(tempfile.gettempdir()) / f"scanet-rev-{sha[:12]}"
    if not (path / ".git").exists():
        _run(["git", "worktree", "add", "--detach", "--force", str(path), sha], REPO, "git worktree add")
    link = path / "scanet" / "kernels"  # scanet.kernels is installed from kernels/: a link for PYTHONPATH use
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    if not list((path / "scanet").glob("_native*.so")):
        _run([sys.executable, "setup.py", "build_ext", "--inplace"], path, f"building the native library of {rev}")
    return path


class RevisionStep:
    """A child process running ``rev``'s fused fp32 Wiki step; calling the object runs one step there and
    returns its seconds. A context manager: the child ends with the block."""

    def __init__(self, rev: str, threads: int = 2):
        self.rev = rev
        self.path = worktree(rev)
        env = dict(os.environ, PYTHONPATH=str(self.path))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(threads)],
            cwd=self.path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline().strip() if self.proc.stdout else ""
        if line != "ready":
            self.close()
            raise RuntimeError(f"the step of revision {rev} did not start (its output: {line!r})")

    def __call__(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def __enter__(self) -> RevisionStep:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
