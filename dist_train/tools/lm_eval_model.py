"""Our decoder served to EleutherAI's lm-evaluation-harness through its `LM` interface (`TemplateLM`).

lm-eval asks a model three things: the log-likelihood of a continuation given a context (multiple choice: one
request per choice), the rolling log-likelihood of a whole text (perplexity tasks, in windows of the model's
length) and greedy generation until a stop string. `TemplateLM` turns strings into tokens the way lm-eval's own
`hf` model does (the same context/continuation split, the same prefix token for an empty context); here the
tokens meet our model directly, with no export:

- requests are batched by length with lm-eval's own `Collator` (longest first, so a batch pads little and the
  first batch shows the memory peak), right-padded, no attention mask (causal: padding after a row changes
  nothing before it);
- only the continuation positions go through the output head and the log-softmax: for a multiple-choice task the
  context is most of each row, and on a small model the head is a large share of the work;
- the attention is plain causal over the request, as `lm_eval --model hf` runs the export, also for a run trained
  with data.document_mask (a request is one document).

The numbers equal `lm_eval --model hf --model_args pretrained=EXPORT` on the run's HF export (tests/test_lm_eval.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's default


class DistTrainLM(TemplateLM):
    """lm-eval's view of one of our causal models (eval mode, on `device`) and the run's tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int, batch_size: int,
                 device: torch.device):
        super().__init__()
        self.model, self.tokenizer, self._max_length = model.eval(), tokenizer, max_length
        self.batch_size, self._device = batch_size, device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS where the tokenizer has one, else EOS (as lm-eval's hf)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def _continuation_log_probs(self, rows: list[list[int]], continuation_lengths: list[int]) -> list[torch.Tensor]:
        """Per row, the log-softmax (fp32) at the positions that predict its last `continuation_length` tokens
        (the row holds the context and the continuation without its last token)."""
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r)
        batch = batch.to(self.device)
        hidden_states = getattr(self.model, "hidden_states", None)
        if hidden_states is None:  # a model.hf_config wrapper: full logits
            logits = self.model(batch)
            return [F.log_softmax(logits[i, len(r) - n:len(r)].float(), dim=-1)
                    for i, (r, n) in enumerate(zip(rows, continuation_lengths))]
        states = hidden_states(batch)  # (B, T, C)
        picked = torch.cat([states[i, len(r) - n:len(r)] for i, (r, n) in enumerate(zip(rows, continuation_lengths))])
        log_probs = F.log_softmax(self.model.lm_head(picked).float(), dim=-1)
        return list(log_probs.split(continuation_lengths))

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would give the continuation), per request."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            # Too long for the model: cut from the left, as lm-eval's hf model does.
            rows = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in chunk]
            lengths = [len(continuation) for _, _, continuation in chunk]
            for (request, _, continuation), log_probs in zip(chunk, self._continuation_log_probs(rows, lengths)):
                targets = torch.tensor(continuation, device=log_probs.device)
                answer = (float(log_probs.gather(1, targets[:, None]).sum()),
                          bool((log_probs.argmax(dim=-1) == targets).all()))
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of the model's length, each window conditioned on the
        text before it (lm-eval's rolling windows; the first on the prefix token)."""
        windows, owners = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            rolling = lm_eval_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                              prefix_token=self.prefix_token_id,
                                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_eval_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_likelihood, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_likelihood
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, one request at a time, until a stop string, EOS or max_gen_toks new tokens."""
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        answers = []
        for context, gen_kwargs in (r.args for r in requests):
            options = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            stops = handle_stop_sequences(options.pop("until", None), eos=eos_text)
            max_new = options.pop("max_gen_toks")
            tokens = self.tok_encode(context)[-(self.max_length - max_new):]
            new: list[int] = []
            while len(new) < max_new:
                log_probs = self._continuation_log_probs([(tokens + new)[-self.max_length:]], [1])[0]  # (1, V)
                new.append(int(log_probs.argmax(dim=-1)))
                if new[-1] == self.eot_token_id or any(s in self.tok_decode(new) for s in stops):
                    break
            answer = postprocess_generated_text(self.tok_decode(new), stops, None)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            answers.append(answer)
        return answers
