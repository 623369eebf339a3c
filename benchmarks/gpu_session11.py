"""Session 11's GPU checks of the new request paths (one call): logprobs against the engine's own forward pass
and a grammar-constrained answer on CUDA, next to free requests in one batch with CUDA graphs on.

    PYTHONPATH=$(bash benchmarks/device_setup.sh) PYTHONSAFEPATH=1 python3 benchmarks/gpu_session11.py ENGINE
"""

import json
import sys
import time

import torch

from lmconvert.runtime import LLMEngine, SamplingParams
from lmconvert.runtime.grammar import Guided

engine = LLMEngine(sys.argv[1], device="cuda", session_len=512)
prompt = list(range(100, 164))
out = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=3))[0]
ref = torch.log_softmax(engine.logits(prompt + out.token_ids).float(), -1)[len(prompt) - 1:-1]
lp_err = max(abs(e.logprob - ref[i, e.token_id].item()) for i, e in enumerate(out.logprobs))
schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "b": {"type": "string", "maxLength": 8}}, "required": ["a", "b"]}
free = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
solo = engine.generate([prompt], free)[0].token_ids
start = time.monotonic()
mixed = engine.generate([prompt] * 4, [SamplingParams(max_tokens=48, temperature=0, guided=Guided.json(schema))] * 2
                        + [free] * 2)
seconds = time.monotonic() - start
valid = []
for o in mixed[:2]:
    try:
        json.loads(o.text)
        valid.append(o.finish_reason == "stop")
    except json.JSONDecodeError:
        valid.append(o.finish_reason == "length")  # cut at max_tokens: a grammar prefix
print(json.dumps({"logprob_max_abs_err": lp_err, "constrained_texts": [o.text for o in mixed[:2]],
                  "constrained_ok": valid, "free_equal_solo": [o.token_ids == solo for o in mixed[2:]],
                  "mixed_seconds": seconds}))
