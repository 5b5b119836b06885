#!/usr/bin/env python3
"""PyTorch / Hugging Face transformers peer baseline for Tandem's GPU benchmark.

Loads a Llama-family model directory (config.json + model.safetensors, usually random weights
written by `tandem make-model`) with transformers and measures, on one device, the figures our
own engine benchmark reports, so the two can be put side by side:

  * decode tokens/s at batch 1, 8, 32, 128 (32-token prompts, N greedy steps, only the decode
    steps timed), and batch-1 decode as a fraction of the weight-streaming roofline;
  * prefill tokens/s and MFU for single prompts of 512, 2048, 8192 tokens;
  * device-to-device copy bandwidth and a bf16 matmul, measured in the same run, so that the
    ratios above are against this machine at this moment, not against a datasheet.

Two modes:
  eager    plain `model(...)` with the default dynamic KV cache;
  compile  `StaticCache` + `torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`
           for decode, as in the transformers "static cache and torch.compile" guide.

Decode loops are written by hand (forward with past_key_values + positions, argmax) rather than
calling `generate()`, so exactly N steps run (no EOS stop) and generate's bookkeeping is not in
the timed region. A tokenizer is never loaded: prompts are random token ids.

Prints a table to stderr and one JSON object to stdout (and to --json FILE). A configuration that
fails (OOM at 8192 tokens, a compile error in this transformers version, ...) is recorded under
"errors" and the others still run.

Usage:
  python3 bench/gpu/torch_peer.py --model-dir DIR [--modes eager,compile] [--batches 1,8,32,128]
      [--prefill 512,2048,8192] [--decode-steps 128] [--reps 3] [--device cuda] [--json OUT.json]
"""

import argparse
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

# The benchmark machine has no internet: make any hub lookup fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Keep transformers' advisory warnings out of the table on stderr.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402  (after the environment above, which transformers reads on import)

# Dense bf16 peak of an H100 SXM, the reference the project quotes MFU against.
H100_PEAK_TFLOPS = 989.0
PROMPT_LEN_DECODE = 32  # prompt length of every decode configuration, as in engine_bench

FLOPS_FORMULA = (
    "flops(T) = 2 * P * T + 4 * L * (T^2 / 2) * H * D, where T = prompt tokens, "
    "P = parameters excluding the input embedding (lm_head included; a tied matrix counted once), "
    "L = layers, H = attention (query) heads, D = head_dim; the second term is QK^T and PV "
    "(2 matmuls x 2 FLOP per multiply-add) over the causal half of the T x T score matrix. "
    "MFU = flops(T) / prefill_seconds / peak. Note: where the forward takes logits_to_keep "
    "(forward_args.logits_kw), lm_head runs on the last position only, so flops(T) counts "
    "2 * lm_head_params * (T - 1) FLOPs that were not done."
)


def log(msg=""):
    print(msg, file=sys.stderr, flush=True)


def parse_int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def error_string(exc):
    """One line that says what failed; the full traceback goes to stderr only."""
    msg = f"{type(exc).__name__}: {exc}".strip()
    return msg if len(msg) <= 2000 else msg[:2000] + " ..."


def version_tuple(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(device, fn):
    """Seconds that `fn` takes on the device: synchronise before and after, so queued work from
    before is not charged to it and its own asynchronous kernels are."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


# ---------------------------------------------------------------------------------------------
# Baselines measured in the same run


def measure_copy_gbps(device, nbytes, tries):
    """Device-to-device copy bandwidth, counting bytes read plus bytes written.

    Best of `tries`: the question is what the memory system can do, and anything slower than
    the best run is interference, not the memory."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page in / allocate before timing
    best = math.inf
    for _ in range(tries):
        seconds, _ = timed(device, lambda: dst.copy_(src))
        best = min(best, seconds)
    return 2 * n * 4 / best / 1e9


def measure_matmul_tflops(device, n, dtype, tries, per_try):
    """Square n x n x n matmul throughput, best of `tries`; each try times `per_try` back-to-back
    matmuls so that one launch's overhead does not count against an 8192^3 product."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):  # library heuristics, clocks ramping up
        torch.matmul(a, b, out=c)

    def run():
        for _ in range(per_try):
            torch.matmul(a, b, out=c)

    best = math.inf
    for _ in range(tries):
        seconds, _ = timed(device, run)
        best = min(best, seconds)
    return 2 * n**3 * per_try / best / 1e12


# ---------------------------------------------------------------------------------------------
# Model


def load_model(model_dir, device, dtype, attn_impl):
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {}
    # transformers 4.56 renamed `torch_dtype` to `dtype`; older versions would silently take an
    # unknown `dtype` as a config attribute and load float32.
    if version_tuple(transformers.__version__) >= (4, 56):
        kwargs["dtype"] = dtype
    else:
        kwargs["torch_dtype"] = dtype
    if attn_impl:
        kwargs["attn_implementation"] = attn_impl
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    except TypeError:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs), {}
    model.to(device)
    model.eval()
    model.config.use_cache = True
    # Random weights from our own writer must still land on every parameter: a name mismatch would
    # leave some at their init values, which times the same but means the file is not what we
    # think, so say so.
    missing = list((info or {}).get("missing_keys", []) or [])
    unexpected = list((info or {}).get("unexpected_keys", []) or [])
    return model, missing, unexpected


def config_summary(model):
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {
        "model_type": getattr(c, "model_type", None),
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "intermediate": getattr(c, "intermediate_size", None),
        "heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "vocab": c.vocab_size,
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": getattr(c, "_attn_implementation", None),
    }


def weight_accounting(model):
    """Bytes of weights a decode step reads, and the parameter count that prefill FLOPs use.

    Every parameter is read once per step except the input embedding, which is only gathered
    (a few rows), unless it is the same matrix as lm_head, in which case it is read whole, once.
    `model.parameters()` already yields a tied matrix once."""
    params = list(model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in params)
    total_count = sum(p.numel() for p in params)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    out_w = out.weight if out is not None else None
    tied = out_w is not None and (out_w is emb or out_w.data_ptr() == emb.data_ptr())
    if tied:
        return total_bytes, total_count, True
    return (
        total_bytes - emb.numel() * emb.element_size(),
        total_count - emb.numel(),
        False,
    )


def prefill_flops(tokens, params, summary):
    linear = 2 * params * tokens
    attention = 4 * summary["layers"] * (tokens * tokens / 2) * summary["heads"] * summary["head_dim"]
    return linear + attention


class ForwardArgs:
    """Keyword arguments that the installed transformers' forward understands.

    transformers <= 5.2 (roughly) wants `cache_position` next to the cache; later 5.x removed it
    (the static cache tracks its own length) and would only swallow it in **kwargs. The argument
    that keeps lm_head to the last position was `num_logits_to_keep` before `logits_to_keep`."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.cache_position = "cache_position" in params
        self.logits_kw = None
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in params:
                self.logits_kw = name
                break

    def positions(self, start, length, batch, device):
        """position_ids (and cache_position where wanted) for `length` tokens from `start`."""
        pos = torch.arange(start, start + length, device=device)
        kw = {"position_ids": pos.unsqueeze(0).expand(batch, -1)}
        if self.cache_position:
            kw["cache_position"] = pos
        return kw

    def last_logits_only(self):
        return {self.logits_kw: 1} if self.logits_kw else {}


def random_prompt(batch, length, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def next_token(out):
    return out.logits[:, -1, :].argmax(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Modes


class EagerMode:
    name = "eager"
    decode_method = (
        "model(...) under torch.inference_mode with the default dynamic KV cache; prefill of the "
        "32-token prompts untimed, then decode steps timed (forward + argmax each)"
    )
    prefill_method = (
        "one model(...) call over the prompt with the default dynamic cache, logits for the last "
        "position only, + argmax; median of reps after one warm-up at the same length"
    )

    def __init__(self, model, device, fa):
        self.model, self.device, self.fa = model, device, fa
        self.warmup_reps = 1

    def decode_once(self, prompt, steps):
        """Prefill (untimed), then `steps` decode steps (timed). Returns (seconds, tokens)."""
        model, fa, device = self.model, self.fa, self.device
        batch, plen = prompt.shape
        # Positions are built before the clock starts: they are inputs, not work the model does.
        step_kw = [fa.positions(plen + i, 1, batch, device) for i in range(steps)]
        out = model(input_ids=prompt, use_cache=True, **fa.positions(0, plen, batch, device),
                    **fa.last_logits_only())
        cache, tok = out.past_key_values, next_token(out)
        del out
        generated = []

        def loop():
            nonlocal cache, tok
            for kw in step_kw:
                o = model(input_ids=tok, past_key_values=cache, use_cache=True, **kw)
                # DynamicCache is updated in place; older versions returned a new tuple instead.
                cache, tok = o.past_key_values, next_token(o)
                generated.append(tok)

        seconds, _ = timed(device, loop)
        return seconds, torch.cat(generated, dim=1)

    def prefill_once(self, prompt):
        fa = self.fa
        batch, plen = prompt.shape

        def run():
            out = self.model(input_ids=prompt, use_cache=True, **fa.positions(0, plen, batch, self.device),
                             **fa.last_logits_only())
            return next_token(out)

        return timed(self.device, run)

    def finish_batch(self):
        pass


class CompileMode:
    name = "compile"
    decode_method = (
        "StaticCache(max_cache_len = 32 + decode_steps), one per batch size, reset between reps; "
        "prefill with the uncompiled forward (as generate() does), decode steps through "
        "torch.compile(model.forward, mode='reduce-overhead', fullgraph=True, dynamic=False) "
        "(CUDA graphs on GPU) + argmax; warm-up reps run the same loop until compiled and captured"
    )
    prefill_method = (
        "torch.compile(model.forward, fullgraph=True, dynamic=False) (default mode: CUDA graphs buy "
        "nothing at >= 512 tokens) called without a KV cache (use_cache=False; the KV write it skips "
        "is negligible), logits for the last position only, + argmax; one compile per length, "
        "warm-up runs untimed"
    )

    def __init__(self, model, device, fa):
        if not hasattr(torch, "compile"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.compile")
        if not hasattr(importlib.import_module("transformers"), "StaticCache"):
            raise RuntimeError("this transformers has no StaticCache")

        # Not `import torch._dynamo`: that would make `torch` a local name of this function.
        self._dynamo = importlib.import_module("torch._dynamo")
        self.model, self.device, self.fa = model, device, fa
        # Two full reps: the first compiles and (under cudagraph trees) runs the warm-up call and
        # records the graph; the second checks that replays are what the timed reps will see.
        self.warmup_reps = 2
        # One compiled graph per batch size plus one per prefill length share the recompile budget
        # of model.forward's code object; the default (8) is too tight for that.
        cfg = self._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 64))
        # fullgraph=True as the guide says; if this transformers version has a graph break in the
        # forward, the caller records the error and falls back to fullgraph=False (see fallback()).
        self.fullgraph = {"decode": True, "prefill": True}
        self._compile("decode")
        self._compile("prefill")
        self.cache = None
        self.cache_key = None

    def _compile(self, which):
        if which == "decode":
            # dynamic=False: one static graph per batch size rather than one symbolic-shape graph,
            # which is what CUDA graphs want anyway.
            self.decode_fn = torch.compile(self.model.forward, mode="reduce-overhead",
                                           fullgraph=self.fullgraph["decode"], dynamic=False)
        else:
            self.prefill_fn = torch.compile(self.model.forward, fullgraph=self.fullgraph["prefill"],
                                            dynamic=False)

    def fallback(self, which):
        """Switch `which` ("decode" or "prefill") to fullgraph=False. False if already there."""
        if not self.fullgraph[which]:
            return False
        self.fullgraph[which] = False
        self._dynamo.reset()  # drop whatever the failed attempt left half-built
        self._compile("decode")
        self._compile("prefill")
        return True

    def _static_cache(self, batch, max_len):
        """One StaticCache per (batch, length), reused across warm-up and timed reps: its tensors'
        addresses are baked into the captured CUDA graph, so a new cache would mean a new capture."""
        from transformers import StaticCache

        key = (batch, max_len)
        if self.cache_key != key:
            self.cache = None
            free_memory(self.device)
            # Newer versions take (config, max_cache_len) and size the rest from the first update;
            # older ones also need batch size, device and dtype. Pass only what this one names.
            wanted = {
                "config": self.model.config,
                "max_cache_len": max_len,
                "max_batch_size": batch,
                "batch_size": batch,
                "device": self.device,
                "dtype": next(self.model.parameters()).dtype,
            }
            params = inspect.signature(StaticCache.__init__).parameters
            kwargs = {k: v for k, v in wanted.items() if k in params}
            if "batch_size" in kwargs and "max_batch_size" in kwargs:
                del kwargs["max_batch_size"]  # 4.4x deprecated the old name in favour of the new
            self.cache = StaticCache(**kwargs)
            self.cache_key = key
        else:
            self.cache.reset()
        return self.cache

    def decode_once(self, prompt, steps):
        model, fa, device = self.model, self.fa, self.device
        batch, plen = prompt.shape
        cache = self._static_cache(batch, plen + steps)
        step_kw = [fa.positions(plen + i, 1, batch, device) for i in range(steps)]
        mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                    **fa.positions(0, plen, batch, device), **fa.last_logits_only())
        tok = next_token(out)
        del out
        generated = []

        def loop():
            nonlocal tok
            for kw in step_kw:
                if mark_step is not None and device.type == "cuda":
                    # Tells cudagraph trees that the previous step's outputs are dead, so replay
                    # may overwrite them (we only keep the argmax, computed outside the graph).
                    mark_step()
                o = self.decode_fn(input_ids=tok, past_key_values=cache, use_cache=True, **kw)
                tok = next_token(o)
                generated.append(tok)

        seconds, _ = timed(device, loop)
        return seconds, torch.cat(generated, dim=1)

    def prefill_once(self, prompt):
        fa = self.fa
        batch, plen = prompt.shape

        def run():
            out = self.prefill_fn(input_ids=prompt, use_cache=False,
                                  **fa.positions(0, plen, batch, self.device), **fa.last_logits_only())
            return next_token(out)

        return timed(self.device, run)

    def finish_batch(self):
        self.cache = None
        self.cache_key = None
        free_memory(self.device)


def cudagraph_skips():
    """How many times inductor fell back from CUDA graphs (a silent slowdown), where torch counts it."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"].get("cudagraph_skips", 0))
    except Exception:
        return None


def bench_decode(mode, args, device, vocab, batch):
    """Warm up, then time `reps` decode runs at one batch size. Returns the list of seconds."""
    steps = args.decode_steps
    prompt = random_prompt(batch, PROMPT_LEN_DECODE, vocab, device, seed=1000 + batch)
    for _ in range(mode.warmup_reps):
        mode.decode_once(prompt, steps)
    times = []
    for _ in range(args.reps):
        seconds, tokens = mode.decode_once(prompt, steps)
        if tuple(tokens.shape) != (batch, steps):
            raise RuntimeError(f"decode produced shape {tuple(tokens.shape)}, want {(batch, steps)}")
        times.append(seconds)
    return times


def bench_prefill(mode, args, device, vocab, tokens):
    prompt = random_prompt(1, tokens, vocab, device, seed=tokens)
    for _ in range(mode.warmup_reps):  # first-call costs (library heuristics; compilation)
        mode.prefill_once(prompt)
    return [mode.prefill_once(prompt)[0] for _ in range(args.reps)]


def attempt(mode, which, key, errors, fn):
    """Run one configuration; on failure record it and return None. In compile mode a failure
    with fullgraph=True is recorded as `<key>_fullgraph` and the configuration is retried once
    with fullgraph=False, so a graph break in this transformers version still yields a number."""
    try:
        return fn()
    except Exception as exc:  # one configuration failing must not stop the others
        log(f"  [{mode.name}] {key} FAILED: {error_string(exc)}")
        traceback.print_exc(file=sys.stderr)
        free_memory(mode.device)
        # Out of memory is not a graph break: retrying without fullgraph would only hide it.
        oom = "out of memory" in str(exc).lower()
        if isinstance(mode, CompileMode) and not oom and mode.fallback(which):
            errors[f"{key}_fullgraph"] = error_string(exc)
            log(f"  [{mode.name}] retrying {key} with fullgraph=False")
            return attempt(mode, which, key, errors, fn)
        errors[key] = error_string(exc)
        return None


def run_mode(mode, args, device, vocab, weight_bytes, copy_gbps, matmul_tflops, params, summary):
    res = {
        "decode_method": mode.decode_method,
        "prefill_method": mode.prefill_method,
        "decode_tokens_per_s": {},
        "decode_step_ms": {},
        "decode_seconds_reps": {},
        "batch1_fraction_of_roofline": None,
        "prefill": {},
        "errors": {},
    }
    steps = args.decode_steps
    for batch in args.batches:
        times = attempt(mode, "decode", f"decode_b{batch}", res["errors"],
                        lambda: bench_decode(mode, args, device, vocab, batch))
        mode.finish_batch()
        free_memory(device)
        if times is None:
            continue
        med = statistics.median(times)
        key = str(batch)
        res["decode_tokens_per_s"][key] = batch * steps / med
        res["decode_step_ms"][key] = med / steps * 1e3
        res["decode_seconds_reps"][key] = times
        log(f"  [{mode.name}] decode batch {batch}: {batch * steps / med:.1f} tok/s "
            f"({med / steps * 1e3:.2f} ms/step)")

    b1 = res["decode_tokens_per_s"].get("1")
    if b1 is not None and copy_gbps and weight_bytes:
        roofline = copy_gbps * 1e9 / weight_bytes
        res["batch1_fraction_of_roofline"] = b1 / roofline

    for tokens in args.prefill:
        times = attempt(mode, "prefill", f"prefill_{tokens}", res["errors"],
                        lambda: bench_prefill(mode, args, device, vocab, tokens))
        free_memory(device)
        if times is None:
            continue
        med = statistics.median(times)
        flops = prefill_flops(tokens, params, summary)
        achieved = flops / med / 1e12
        res["prefill"][str(tokens)] = {
            "tokens_per_s": tokens / med,
            "seconds": med,
            "seconds_reps": times,
            "flops": flops,
            "achieved_tflops": achieved,
            "mfu_vs_measured_matmul": achieved / matmul_tflops if matmul_tflops else None,
            "mfu_vs_989_tflops": achieved / H100_PEAK_TFLOPS,
        }
        log(f"  [{mode.name}] prefill {tokens}: {tokens / med:.1f} tok/s, {achieved:.2f} TFLOP/s")

    if isinstance(mode, CompileMode):
        res["fullgraph"] = dict(mode.fullgraph)
        res["cudagraph_skips"] = cudagraph_skips()
    return res


def empty_mode_result(err):
    return {
        "decode_tokens_per_s": {},
        "batch1_fraction_of_roofline": None,
        "prefill": {},
        "errors": {"setup": err},
    }


# ---------------------------------------------------------------------------------------------
# Output


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_table(report):
    c = report["config"]
    log()
    log(f"model: {report['model_dir']}  ({c['model_type']}, {c['layers']} layers, hidden {c['hidden']}, "
        f"{c['heads']}/{c['kv_heads']} heads x {c['head_dim']}, vocab {c['vocab']}, {c['dtype']}, "
        f"attn {c['attn_implementation']})")
    log(f"device: {report['gpu_name'] or report['device']}   torch {report['torch_version']}, "
        f"transformers {report['transformers_version']}")
    wb = report["weight_bytes_per_token"]
    rl = report["roofline_decode_tokens_per_s_batch1"]
    log(f"copy {fmt(report['copy_gbps'])} GB/s (read+write), matmul {fmt(report['matmul_tflops'], '.2f')} "
        f"TFLOP/s, weights {wb / 1e9:.3f} GB/token -> batch-1 roofline {fmt(rl)} tok/s")
    batches = [str(b) for b in report["settings"]["batches"]]
    lengths = [str(t) for t in report["settings"]["prefill_lengths"]]
    head = f"{'mode':<8} " + " ".join(f"{'b' + b + ' tok/s':>12}" for b in batches) + f" {'b1/roof':>8}"
    head += " | " + " ".join(f"{'pf' + t + ' tok/s (MFU)':>24}" for t in lengths)
    log(head)
    for name, m in report["modes"].items():
        row = f"{name:<8} " + " ".join(f"{fmt(m['decode_tokens_per_s'].get(b)):>12}" for b in batches)
        frac = m.get("batch1_fraction_of_roofline")
        row += f" {('-' if frac is None else f'{100 * frac:.1f}%'):>8} | "
        cells = []
        for t in lengths:
            p = m["prefill"].get(t)
            if p is None:
                cells.append(f"{'-':>24}")
            else:
                mfu = p["mfu_vs_measured_matmul"]
                mfu_text = "-" if mfu is None else f"{100 * mfu:.1f}%"
                cells.append(f"{p['tokens_per_s']:>14.1f} ({mfu_text})".rjust(24))
        log(row + " ".join(cells))
        for k, v in m["errors"].items():
            log(f"    error {name}/{k}: {v[:200]}")
    for k, v in report["errors"].items():
        log(f"    error {k}: {v[:200]}")
    log("MFU in the table is against the matmul measured above; mfu_vs_989_tflops is in the JSON.")


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    ap.add_argument("--modes", default=None,
                    help="comma list of eager,compile (default: both on cuda, eager only on cpu)")
    ap.add_argument("--batches", default="1,8,32,128", help="decode batch sizes")
    ap.add_argument("--prefill", default="512,2048,8192", help="prefill prompt lengths")
    ap.add_argument("--decode-steps", type=int, default=128, help="timed decode steps per sequence")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is reported")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--attn-impl", default=None,
                    help="attn_implementation to load with (default: the library's, usually sdpa)")
    ap.add_argument("--copy-mib", type=int, default=None,
                    help="copy baseline size in MiB (default 2048 on GPU, 256 on CPU)")
    ap.add_argument("--matmul-n", type=int, default=None,
                    help="matmul baseline size n of n x n x n (default 8192 on GPU, 1024 on CPU)")
    ap.add_argument("--skip-baselines", action="store_true", help="skip the copy and matmul baselines")
    ap.add_argument("--json", default=None, help="also write the JSON object to this file")
    args = ap.parse_args(argv)

    args.batches = parse_int_list(args.batches)
    args.prefill = parse_int_list(args.prefill)
    if args.decode_steps < 1 or args.reps < 1:
        ap.error("--decode-steps and --reps must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False (use --device cpu for a test run)")
    on_gpu = device.type == "cuda"
    if on_gpu and device.index is not None:
        torch.cuda.set_device(device)
    modes = parse_modes(args.modes, on_gpu, ap)
    dtype = getattr(torch, args.dtype)

    import transformers

    report = {
        "tool": "bench/gpu/torch_peer.py",
        "model_dir": os.path.abspath(args.model_dir),
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if on_gpu else None,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "settings": {
            "modes": modes,
            "batches": args.batches,
            "prefill_lengths": args.prefill,
            "decode_prompt_len": PROMPT_LEN_DECODE,
            "decode_steps": args.decode_steps,
            "reps": args.reps,
            "statistic": "median of reps (baselines: best of several)",
            "dtype": args.dtype,
        },
        "errors": {},
    }

    # Baselines first, on an otherwise empty device.
    copy_gbps = matmul_tflops = None
    if not args.skip_baselines:
        copy_mib = args.copy_mib or (2048 if on_gpu else 256)
        matmul_n = args.matmul_n or (8192 if on_gpu else 1024)
        log(f"baselines: copy {copy_mib} MiB, matmul {matmul_n}^3 {args.dtype} ...")
        try:
            copy_gbps = measure_copy_gbps(device, copy_mib << 20, tries=10 if on_gpu else 5)
        except Exception as exc:
            report["errors"]["copy_baseline"] = error_string(exc)
        try:
            matmul_tflops = measure_matmul_tflops(device, matmul_n, dtype, tries=5 if on_gpu else 3,
                                                  per_try=10 if on_gpu else 1)
        except Exception as exc:
            report["errors"]["matmul_baseline"] = error_string(exc)
        free_memory(device)  # give the baselines' buffers back before the model loads
        report["copy_bytes"] = copy_mib << 20
        report["matmul_shape"] = [matmul_n, matmul_n, matmul_n]
    report["copy_gbps"] = copy_gbps
    report["copy_gbps_convention"] = (
        "bytes read + bytes written per second, 1 GB = 1e9 B, best of several copies; this "
        "traffic is the roofline's bandwidth (what HBM sustains; a weight-reading decode can "
        "approach it), as read_bandwidth_gbps in bench/engine/engine_bench"
    )
    report["matmul_tflops"] = matmul_tflops

    log(f"loading {args.model_dir} ({args.dtype}) ...")
    try:
        model, missing, unexpected = load_model(args.model_dir, device, dtype, args.attn_impl)
    except Exception as exc:
        # Nothing can be measured without the model, but a caller parsing stdout still gets JSON
        # that says why (and the baselines, which did run).
        traceback.print_exc(file=sys.stderr)
        report["errors"]["load"] = error_string(exc)
        emit(report, args.json)
        return 1
    summary = config_summary(model)
    weight_bytes, params, tied = weight_accounting(model)
    report["config"] = summary
    report["missing_keys"] = missing
    report["unexpected_keys"] = unexpected
    report["weight_bytes_per_token"] = weight_bytes
    report["weight_bytes_note"] = (
        "sum of parameter bytes read per decode step: every parameter once, minus the input "
        "embedding when it is not tied to lm_head (a tied matrix counts once)"
    )
    report["nonembedding_params"] = params
    report["weights_tied"] = tied  # as loaded: lm_head and the input embedding share storage
    report["lm_head_params"] = model.get_output_embeddings().weight.numel()
    report["roofline_decode_tokens_per_s_batch1"] = (
        copy_gbps * 1e9 / weight_bytes if copy_gbps else None
    )
    report["flops_formula"] = FLOPS_FORMULA
    report["peak_tflops_reference"] = {"value": H100_PEAK_TFLOPS, "what": "H100 SXM dense bf16"}
    report["batch1_fraction_of_roofline_formula"] = (
        "decode_tokens_per_s['1'] / (copy_gbps * 1e9 / weight_bytes_per_token)"
    )
    if missing:
        log(f"warning: {len(missing)} parameters were not in the checkpoint (left at init): {missing[:5]}")

    fa = ForwardArgs(model)
    report["forward_args"] = {"cache_position": fa.cache_position, "logits_kw": fa.logits_kw}
    # transformers' own claim that this model compiles without graph breaks (None where absent).
    report["model_can_compile_fullgraph"] = getattr(model, "_can_compile_fullgraph", None)
    report["modes"] = {}
    with torch.inference_mode():
        for name in modes:
            log(f"mode {name}:")
            try:
                mode = EagerMode(model, device, fa) if name == "eager" else CompileMode(model, device, fa)
            except Exception as exc:
                report["modes"][name] = empty_mode_result(error_string(exc))
                log(f"  [{name}] setup FAILED: {error_string(exc)}")
                continue
            report["modes"][name] = run_mode(mode, args, device, summary["vocab"], weight_bytes, copy_gbps,
                                             matmul_tflops, params, summary)
            del mode
            free_memory(device)

    print_table(report)
    emit(report, args.json)
    return 0


def emit(report, path):
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def parse_modes(text, on_gpu, ap):
    if text is None:
        return ["eager", "compile"] if on_gpu else ["eager"]
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        if m not in ("eager", "compile"):
            ap.error(f"unknown mode {m!r} (want eager or compile)")
    return modes


if __name__ == "__main__":
    sys.exit(main())
