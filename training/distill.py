"""`draftpick distill`: train a small drafter from the target (token-level distillation).

Two kinds of student, both with an output head made of the target's embedding rows
for the `vocab` most frequent tokens of the training text (a reduced output
vocabulary: the 49,152-wide output layer would otherwise dominate a small
drafter's cost):

- `feature` (default, EAGLE-like; workers.drafters.feature): a one-layer head that
  predicts the target's next hidden state from its current one and the next
  token's embedding. Only the head is trained and stored.
- `target-layers:N` (LayerSkip-like): the target's token embeddings (frozen), its
  first N decoder layers and final norm, a causal LM of its own. The output
  directory is a transformers model directory plus `draftpick_vocab.json`.

Training minimises KL(teacher || student) on the reduced vocabulary, over text run
through the teacher in batches (token-level distillation on the target's logits).
Text can be the installed prompt sets, any JSONL of prompts, or traffic captured by
the service (the target's own outputs: sequence-level distillation on what users
ask). `--generate N` makes such traffic offline: the target first answers every
training prompt (greedy, batched; `sequences.jsonl` in the output directory, in the
capture format, resumable) and the student then learns on prompt + answer, the text
it will draft at serving time; `--loss-on answers` then learns only the answer tokens
(the prompt is context), as EAGLE's loss mask does. The teacher's hidden states of each training window
are kept in memory (`teacher_cache_gb`), so passes after the first over a small
text skip the teacher's forward. Everything runs on `device` (cpu or cuda: the target, its answers,
the student; the learning rate decays, cosine, to a tenth over the run). Checkpoints (`checkpoint.pt`)
make a run resumable; the final line
of a run is an honest validation figure: mean acceptance length at k = 4 on
held-out prompts.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from draftpick.workers.drafters.model import VOCAB_FILE
from draftpick.workers.drafters.feature import WEIGHTS, FeatureHead, is_feature_drafter, load_head, save_head

DEFAULT_VOCAB = 8192  # a new student's reduced output vocabulary (--vocab)


@dataclass(frozen=True)
class DistillSettings:
    out: str
    init: str = "feature"  # EAGLE-like head; or "target-layers:N", or a directory holding an earlier drafter
    steps: int | None = None
    minutes: float | None = None
    seq_len: int = 256
    batch: int = 8
    lr: float = 1e-3
    vocab: int | None = None  # reduced output vocabulary: 8,192 for a new student; one continued (--init DIR)
    # keeps its own unless this is given, which widens it with the most frequent learnt tokens it lacks
    teacher_dtype: str = "fp32"  # bf16: faster on CPUs with native bf16 and on GPUs (its top-1 rarely differs)
    student_dtype: str = "fp32"  # bf16: the student's matrix products autocast (fp32 weights); ~1.6x on such CPUs
    checkpoint_every: int = 50
    unroll: int = 1  # feature heads: extra training steps that feed the head its own predictions
    teacher_cache_gb: float = 2.0  # the teacher's hidden states of this many GiB of windows are kept (fp16)
    loss_on: str = "all"  # answers: learn to predict only answer tokens of (prompt, answer) items (EAGLE's loss mask)
    prompt_context: int | None = None  # (prompt, answer) items keep only this many last prompt tokens (context)
    weights: str = "int8"  # how a feature head is stored: int8, int4 or bf16 (workers.drafters.feature.save_head)
    device: str = "cpu"  # where the teacher and the student run: cpu or cuda (the target must already be there)
    seed: int = 0

    def __post_init__(self):
        if self.steps is None and self.minutes is None:
            raise ValueError("give --steps or --minutes")
        if (self.steps is not None and self.steps < 1) or (self.minutes is not None and self.minutes <= 0):
            raise ValueError("--steps must be >= 1 and --minutes > 0")
        if self.seq_len < 8 or self.batch < 1 or (self.vocab is not None and self.vocab < 16):
            raise ValueError("need --seq-len >= 8, --batch >= 1, --vocab >= 16")
        if self.unroll < 1:
            raise ValueError("--unroll must be >= 1")
        if self.teacher_dtype not in ("fp32", "bf16"):
            raise ValueError("--teacher-dtype must be fp32 or bf16")
        if self.student_dtype not in ("fp32", "bf16"):
            raise ValueError("--student-dtype must be fp32 or bf16")
        if self.teacher_cache_gb < 0:
            raise ValueError("--teacher-cache-gb must be >= 0")
        if self.prompt_context is not None and self.prompt_context < 0:
            raise ValueError("--prompt-context must be >= 0")
        if self.weights not in WEIGHTS:
            raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.loss_on not in ("all", "answers"):
            raise ValueError(f"--loss-on must be all or answers, got {self.loss_on!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")


Text = str | list[int] | tuple[list[int], list[int]]  # text, token ids, or (prompt ids, answer ids)


def token_stream(tokenizer, texts: list[Text], prompt_context: int | None = None) -> tuple[list[int], list[bool]]:
    """Texts joined into one stream, each ended by EOS, and for each token whether it is answer text:
    False on the prompt of a (prompt ids, answer ids) pair, True everywhere else (a plain text is
    learnt whole). `prompt_context` keeps only the last that many tokens of each such prompt."""
    ids: list[int] = []
    answer: list[bool] = []
    eos = tokenizer.eos_token_id
    for t in texts:
        if isinstance(t, tuple):
            prompt = t[0] if prompt_context is None else t[0][max(len(t[0]) - prompt_context, 0) :]
            ids.extend(prompt + t[1])
            answer.extend([False] * len(prompt) + [True] * len(t[1]))
        else:
            new = tokenizer(t).input_ids if isinstance(t, str) else t
            ids.extend(new)
            answer.extend([True] * len(new))
        if eos is not None and ids and ids[-1] != eos:
            ids.append(eos)
            answer.append(True)
    return ids, answer


SEQUENCES_FILE = "sequences.jsonl"


@contextmanager
def teacher_mode(teacher_dtype: str, device: str = "cpu"):
    """Inference mode for the teacher, autocast to bf16 when --teacher-dtype bf16."""
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=teacher_dtype == "bf16"):
        yield


def generate_sequences(target, tokenizer, prompts: list[list[int]], path: Path, max_new_tokens: int,
                       batch: int = 16, teacher_dtype: str = "fp32", progress: bool = True,
                       minutes: float | None = None) -> list[list[int]]:
    """Sequence-level distillation data: the target's greedy answer to each prompt, generated in
    batches (prompts sorted by length, left-padded) on the target's device. Each answer is appended
    to `path` as captured traffic ({"prompt_token_ids", "token_ids"}), so an interrupted run resumes
    after the last line and the file can be reused as `--prompts`. With `minutes`, answering stops
    after the batch that passes that time (a later run resumes). Returns prompt + answer ids of the
    answered prompts, in the sorted order."""
    from tqdm import tqdm

    from draftpick.workers.inputs import iter_jsonl

    order = sorted(prompts, key=len)
    done = [d["prompt_token_ids"] + d["token_ids"] for _, d in iter_jsonl(path)] if path.exists() else []
    if len(done) > len(order) or [s[: len(p)] for s, p in zip(done, order)] != order[: len(done)]:
        raise ValueError(f"{path} holds answers to other prompts: remove it or use another --out")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = target.device
    bar = tqdm(total=len(order), initial=len(done), desc="generate", unit="prompt", file=sys.stderr, disable=not progress)
    start = time.perf_counter()
    with path.open("a") as f:
        for i in range(len(done), len(order), batch):
            if minutes is not None and time.perf_counter() - start >= minutes * 60:
                print(f"generate: stopped after {minutes} min with {len(done)} of {len(order)} prompts answered",
                      file=sys.stderr)
                break
            rows = order[i : i + batch]
            width = max(map(len, rows))
            x = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            with teacher_mode(teacher_dtype, device.type):
                out = target.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad, eos_token_id=eos)
            for r, new in zip(rows, out[:, width:].tolist()):
                if eos in new:
                    new = new[: new.index(eos) + 1]
                f.write(json.dumps({"prompt_token_ids": r, "token_ids": new}) + "\n")
                done.append(r + new)
            f.flush()
            bar.update(len(rows))
    bar.close()
    return done


def kept_vocabulary(stream: list[int], size: int, always: list[int]) -> list[int]:
    """The `size` most frequent token ids of the training text (plus special tokens), sorted."""
    counts = Counter(stream)
    kept = set(always)
    for tok, _ in counts.most_common():
        if len(kept) >= size:
            break
        kept.add(tok)
    return sorted(kept)


def build_student(target, n_layers: int, kept: list[int]):
    """Embeddings (frozen) + first n_layers + norm of the target, head = target embedding rows."""
    from transformers import AutoModelForCausalLM

    cfg = target.config.__class__.from_dict(target.config.to_dict())
    cfg.num_hidden_layers = n_layers
    cfg.tie_word_embeddings = False
    if hasattr(cfg, "layer_types") and cfg.layer_types:
        cfg.layer_types = cfg.layer_types[:n_layers]
    cfg.quantization_config = None
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    src = target.state_dict()
    own = student.state_dict()
    for name in own:
        if name == "lm_head.weight":
            own[name].copy_(target.get_output_embeddings().weight.detach().float())
        elif name in src:
            own[name].copy_(src[name].float())
    student.model.embed_tokens.weight.requires_grad_(False)
    return student


def trimmed_logits(model, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """hidden [..., d] -> logits over the kept ids [..., len(kept)]."""
    return hidden @ model.lm_head.weight[kept].T


class Distiller:
    def __init__(self, target, tokenizer, texts: list[Text], settings: DistillSettings, progress=True):
        self.s, self.target, self.tok, self.progress = settings, target, tokenizer, progress
        self.device = torch.device(settings.device)
        if target.device.type != self.device.type:
            raise ValueError(f"the target is on {target.device.type}, but --device is {settings.device}")
        torch.manual_seed(settings.seed)
        self.stream, answer = token_stream(tokenizer, texts, settings.prompt_context)
        if len(self.stream) < settings.seq_len + 1:
            raise ValueError(f"training text too short: {len(self.stream)} tokens < --seq-len {settings.seq_len}")
        if settings.loss_on == "answers" and all(answer):
            raise ValueError("--loss-on answers needs prompt + answer items: captured traffic, its JSONL, or --generate")
        # weight of position p: the logits there predict token p + 1, learnt when that token is answer text
        self.weight = answer[1:] + answer[:1] if settings.loss_on == "answers" else None
        self.out = Path(settings.out)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self.out / "checkpoint.pt"
        self._check_out_dir(tokenizer, target)
        learnt = [t for t, a in zip(self.stream, answer) if a] if self.weight is not None else self.stream
        self.step, self.elapsed, self.pos = 0, 0.0, 0
        state = torch.load(ckpt, weights_only=False, map_location="cpu") if ckpt.exists() else None
        if state is not None:
            self._resume(state, target)
        elif settings.init == "feature" or settings.init.startswith("target-layers:"):
            self._fresh(target, tokenizer, learnt)
        else:
            self._continue(target, tokenizer, learnt)
        self.student.to(self.device)
        self.kept_t = torch.tensor(self.kept, device=self.device)
        # the teacher's output rows of the kept ids: its logits there are hidden @ rows.T
        self.teacher_rows = target.get_output_embeddings().weight[self.kept_t].detach().float()
        self.embed = target.get_input_embeddings()
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        if state is not None:
            self.opt.load_state_dict(state["opt"])
        self.losses: list[float] = []
        d = target.config.hidden_size
        self.cache: dict[int, torch.Tensor] = {}  # window start -> the teacher's hidden states there (fp16)
        self.cache_windows = int(settings.teacher_cache_gb * 2**30 / (settings.seq_len * d * 2))

    def _resume(self, state: dict, target) -> None:
        """The student and the run's position from a checkpoint of this output directory."""
        self.kept, self.n_layers = state["kept"], state["n_layers"]
        self.kind = state.get("kind", "layers")
        self.student = self._new_student(target)
        self.student.load_state_dict(state["model"])
        self.step, self.elapsed, self.pos = state["step"], state["elapsed"], state["pos"]

    def _fresh(self, target, tokenizer, learnt: list[int]) -> None:
        """A new student (--init feature or target-layers:N) with the most frequent learnt tokens as its vocabulary."""
        specials = [i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None]
        self.kept = kept_vocabulary(learnt, self.s.vocab or DEFAULT_VOCAB, specials)
        self.kind = "feature" if self.s.init == "feature" else "layers"
        self.n_layers = 1 if self.kind == "feature" else _init_layers(self.s.init)
        self.student = self._new_student(target)

    def _continue(self, target, tokenizer, learnt: list[int]) -> None:
        """Continue from an earlier drafter (--init DIR): a feature head or a distilled LM; --vocab widens it."""
        if is_feature_drafter(self.s.init):
            self.kind, self.n_layers = "feature", 1
            self.student, self.kept = load_head(self.s.init, target)
        else:
            self.kind = "layers"
            self.student, self.kept = _load_drafter(Path(self.s.init), tokenizer, target)
            self.student.model.embed_tokens.weight.requires_grad_(False)
            self.n_layers = self.student.config.num_hidden_layers
        if self.s.vocab is not None:  # widen: output rows are the target's, nothing to relearn but the new ones
            if self.s.vocab < len(self.kept):
                raise ValueError(f"--vocab {self.s.vocab} is below the vocabulary of --init ({len(self.kept)}): "
                                 "a continued drafter's vocabulary only widens")
            self.kept = kept_vocabulary(learnt, self.s.vocab, self.kept)

    def _new_student(self, target):
        if self.kind == "feature":
            return FeatureHead.from_target(target)
        return build_student(target, self.n_layers, self.kept)

    def _check_out_dir(self, tokenizer, target) -> None:
        """Refuse to resume into a directory that holds a drafter for another tokenizer or target."""
        if is_feature_drafter(self.out):
            load_head(self.out, target)
        elif (self.out / "config.json").exists():
            _load_drafter(self.out, tokenizer, target)

    def batch(self) -> tuple[torch.Tensor, list[int]]:
        """The next B windows of the stream (wrapping around: a pass over it is an epoch) and their starts."""
        T, B = self.s.seq_len, self.s.batch
        rows, starts = [], []
        for _ in range(B):
            if self.pos + T > len(self.stream):
                self.pos = 0
            rows.append(self.stream[self.pos : self.pos + T])
            starts.append(self.pos)
            self.pos += T
        return torch.tensor(rows, device=self.device), starts  # [B, T]

    def weights(self, starts: list[int]) -> torch.Tensor | None:
        """Per-position loss weights [B, T] of the windows (--loss-on answers), else None."""
        if self.weight is None:
            return None
        T = self.s.seq_len
        return torch.tensor([self.weight[s : s + T] for s in starts], dtype=torch.float32, device=self.device)

    def teacher_hidden(self, x: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """The target's last hidden states [B, T, d] of the windows, from the cache where it has them."""
        missing = [i for i, s in enumerate(starts) if s not in self.cache]
        fresh = {}
        if missing:
            with teacher_mode(self.s.teacher_dtype, self.device.type):
                hidden = self.target.model(input_ids=x[missing]).last_hidden_state
            fresh = dict(zip(missing, hidden.float().clone()))  # clone: out of inference mode
            if len(self.cache) + len(missing) <= self.cache_windows:
                self.cache.update((starts[i], h.half()) for i, h in fresh.items())
        return torch.stack([fresh[i] if i in fresh else self.cache[s].float() for i, s in enumerate(starts)])

    def train_step(self) -> float:
        x, starts = self.batch()  # [B, T]
        w = self.weights(starts)
        t_hidden = self.teacher_hidden(x, starts)
        t_logp = torch.log_softmax(t_hidden @ self.teacher_rows.T, -1)  # [B, T, V'] on the kept ids
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.student_dtype == "bf16"):
            if self.kind == "feature":
                loss = self._feature_loss(x, t_hidden, t_logp, w)
            else:
                hidden = self.student.model(input_ids=x).last_hidden_state  # [B, T, d]
                loss = _kl(trimmed_logits(self.student, hidden, self.kept_t), t_logp, w)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def _feature_loss(self, x, t_hidden, t_logp, w=None) -> torch.Tensor:
        """EAGLE-style: from (f_j, x_{j+1}) predict f_{j+1}; KL of its logits to the teacher's at j + 1,
        plus a small smooth-L1 pull toward the true feature. With --unroll > 1, further steps feed the
        head its own predictions back (as drafting does beyond the first token), scored the same way."""
        with torch.no_grad():
            emb = self.embed(x).float()  # [B, T, d], the target's frozen embeddings
        loss = 0.0
        feats = t_hidden[:, :-1]
        for step in range(1, self.s.unroll + 1):
            pred = self.student(feats, emb[:, step:])  # [B, T - step, d] predicts f_{j+step}
            p, true, t, ws = pred, t_hidden[:, step:], t_logp[:, step:], None
            if w is not None:  # score only the weighted positions: the vocabulary projection dominates the cost
                sel = w[:, step:] > 0
                p, true, t, ws = p[sel], true[sel], t[sel], w[:, step:][sel]
            loss = loss + _kl(p @ self.teacher_rows.T, t, ws) + \
                0.1 * _weighted_mean(torch.nn.functional.smooth_l1_loss(p.float(), true, reduction="none").mean(-1), ws)
            feats = pred[:, :-1]
        return loss / self.s.unroll

    def run(self) -> dict:
        from tqdm import tqdm

        s = self.s
        total = s.steps
        bar = tqdm(total=total, initial=min(self.step, total or 0) if total else 0, desc="distill", unit="step",
                   file=sys.stderr, disable=not self.progress)
        start = time.perf_counter() - self.elapsed
        while True:
            if s.steps is not None and self.step >= s.steps:
                break
            if s.minutes is not None and time.perf_counter() - start >= s.minutes * 60:
                break
            for group in self.opt.param_groups:
                group["lr"] = self.lr(time.perf_counter() - start)
            loss = self.train_step()
            self.step += 1
            self.losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", tok=self.step * s.batch * s.seq_len)
            self.elapsed = time.perf_counter() - start
            if self.step % s.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        self.elapsed = time.perf_counter() - start
        self.save_checkpoint()
        self.save()
        return {"steps": self.step, "tokens": self.step * s.batch * s.seq_len, "seconds": self.elapsed,
                "first_loss": self.losses[0] if self.losses else None, "last_loss": self.losses[-1] if self.losses else None}

    def lr(self, elapsed: float) -> float:
        """Cosine decay from --lr to a tenth of it over the run (by steps or minutes, whichever ends it first)."""
        s = self.s
        done = max(self.step / s.steps if s.steps else 0.0, elapsed / (s.minutes * 60) if s.minutes else 0.0)
        return s.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))

    def save_checkpoint(self) -> None:
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save({"model": self.student.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "elapsed": self.elapsed, "pos": self.pos, "kept": self.kept, "n_layers": self.n_layers,
                    "kind": self.kind}, tmp)
        tmp.replace(self.out / "checkpoint.pt")

    def save(self) -> None:
        if self.kind == "feature":
            save_head(self.out, self.student, self.kept, self.target, self.s.weights)
            return
        self.student.save_pretrained(self.out)
        self.tok.save_pretrained(self.out)
        (self.out / VOCAB_FILE).write_text(json.dumps(self.kept))


def _kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) summed over the (kept) vocabulary, averaged over tokens (weighted by `weight`)."""
    s_logp = torch.log_softmax(student_logits.float(), -1)  # fp32 even when the logits were autocast
    per_token = torch.nn.functional.kl_div(s_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
    return _weighted_mean(per_token, weight)


def _weighted_mean(per_token: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions, or their weighted mean (0 when no position has weight)."""
    if weight is None:
        return per_token.mean()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def _load_drafter(path: Path, tokenizer, target):
    from transformers import AutoModelForCausalLM

    from draftpick.workers.models import check_same_vocabulary

    if not (path / "config.json").exists():
        raise ValueError(f"--init {str(path)!r} is not a drafter directory (and not feature or target-layers:N)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    check_same_vocabulary(tokenizer, target, str(path), model, str(path))
    f = path / VOCAB_FILE
    kept = json.loads(f.read_text()) if f.is_file() else list(range(model.config.vocab_size))
    return model, kept


def _init_layers(init: str) -> int:
    if init.startswith("target-layers:"):
        try:
            n = int(init.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise ValueError(f"--init must be feature, target-layers:N with N >= 1, or a drafter directory "
                     f"(or resume from --out), got {init!r}")


def validate(engine, drafter_name: str, prompts: list[list[int]], max_tokens: int = 64, k: int = 4) -> dict:
    """Mean acceptance length at k (greedy, counting the bonus token) and speed vs plain decoding."""
    from draftpick.policies.types import Arm
    from draftpick.workers.sampling import SamplingParams

    from draftpick.workers.metrics import spec_decode_metrics

    spec = plain = 0.0
    tokens = 0
    records = []
    for ids in prompts:
        a = engine.generate(ids, SamplingParams(max_tokens=max_tokens), Arm(drafter_name, k))
        b = engine.generate(ids, SamplingParams(max_tokens=max_tokens), Arm("none", 0))
        assert a.token_ids == b.token_ids, "distilled drafter changed the output: verification is broken"
        records += a.records
        spec += a.generate_s
        plain += b.generate_s
        tokens += len(a.token_ids)
    mean = spec_decode_metrics(records)["mean_acceptance_length"] or 1.0
    return {"k": k, "prompts": len(prompts), "mean_acceptance_length": mean,
            "speedup_vs_plain": plain / spec if spec else math.nan, "tokens": tokens}
