"""Constrained decoding: the reply grammar of 02_policy (a memory line, then one action of 01_env's grammar) as
token-level masks for the sampler and the trainer.

A randomly initialised model writes noise; restricted to the reply grammar it writes valid
(random) actions from its first step, which is what lets RL start from scratch. outlines-core compiles the
grammar (a regex) into token-level transitions. Two rules make it exact for RL:
 * budget: a token is allowed only if a complete reply can still end within max_new_tokens after it, so a
   constrained reply is never truncated;
 * log-probs: the sampler draws from softmax(logits / T) renormalised over the allowed tokens, and the behaviour
   log-probs it returns are those of that masked distribution. Policy.logprobs replays the same mask over the
   response tokens, so pi_theta, pi_prox and pi_behave in the loss are all the distribution actually sampled.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from asyncwebrl import load

env = load("01_env")

_STR = r'[ !#-\[\]-~]*'  # printable ASCII without " and \ (an unbounded repeat: bounded ones blow up the DFA)
_INT = r"(1000|[1-9][0-9]{0,2}|0)"


def reply_regex(n_marks: int) -> str:
    mark = "#(" + "|".join(str(i) for i in range(max(n_marks, 1))) + ")"
    keys = "|".join(sorted(env.KEYS))
    action = (rf'click\({mark}\)|click\({_INT}, {_INT}\)|type\({mark}, "{_STR}"\)|type\("{_STR}"\)|'
              rf'press\("({keys})"\)|scroll\((up|down)\)|go_back\(\)|answer\("{_STR}"\)')
    return rf"Memory: [ -~]*\nAction: ({action})"


class ActionGrammar:
    def __init__(self, tokenizer, max_new_tokens: int, memory_tokens: int):
        from outlines_core import Vocabulary
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {u: b for b, u in bytes_to_unicode().items()}  # byte-level BPE spells bytes as unicode chars
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())  # control tokens
        vocab: dict[bytes, list[int]] = {}
        for tok, i in tokenizer.get_vocab().items():
            if i not in special and all(c in byte_of for c in tok):
                vocab.setdefault(bytes(byte_of[c] for c in tok), []).append(i)
        self.newline = {i for b, ids in vocab.items() if b"\n" in b for i in ids}  # tokens that end the memory line
        self.eos, self.budget, self.memory_budget = tokenizer.eos_token_id, max_new_tokens, memory_tokens
        self.vocab_size = len(tokenizer)
        self.vocabulary = Vocabulary(self.eos, vocab)

    @lru_cache(maxsize=64)
    def automaton(self, n_marks: int):
        """(index, transitions, table, memory_states); table[s] = (tokens, dist after token, ends memory line),
        where dist[s] = fewest tokens from state s to a complete reply."""
        from outlines_core import Index

        index = Index(reply_regex(n_marks), self.vocabulary)
        trans = index.get_transitions()
        dist = {s: 0 for s in index.get_final_states()}
        frontier, back = list(dist), {}
        for s, edges in trans.items():
            for s2 in set(edges.values()):
                back.setdefault(s2, []).append(s)
        while frontier:  # breadth-first search backwards from the final states
            reached = {s: dist[s2] + 1 for s2 in frontier for s in back.get(s2, ()) if s not in dist}
            dist.update(reached)
            frontier = list(reached)
        memory, frontier = set(), [index.get_initial_state()]
        while frontier:  # states inside the memory line: reachable without a newline
            s = frontier.pop()
            if s not in memory:
                memory.add(s)
                frontier += [s2 for tok, s2 in trans.get(s, {}).items() if tok not in self.newline]
        table = {s: (np.array(list(e)), np.array([dist.get(s2, 10**9) for s2 in e.values()]),
                     np.array([tok in self.newline for tok in e])) for s, e in trans.items()}
        if dist[index.get_initial_state()] + 1 > self.budget:
            raise ValueError(f"max_new_tokens={self.budget} cannot fit the shortest valid reply")
        return index, trans, table, memory

    def allowed(self, n_marks: int, state: int, t: int) -> np.ndarray:
        """Tokens allowed at reply position t (0-based) in `state`: the reply must still end (with EOS) in budget,
        and a memory line that reached its budget must end now."""
        index, _, table, memory = self.automaton(n_marks)
        toks, dists, ends_line = table.get(state, (np.zeros(0, int), np.zeros(0, int), np.zeros(0, bool)))
        ok = dists + 2 <= self.budget - t  # this token, dist more, then EOS
        if t >= self.memory_budget and state in memory and (ok & ends_line).any():
            ok &= ends_line
        return np.append(toks[ok], self.eos) if index.is_final_state(state) else toks[ok]

    def step(self, n_marks: int, state: int, token: int) -> int:
        return self.automaton(n_marks)[1][state][token]

    def masks(self, n_marks: int, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), V] bool: what the sampler allowed at each position of this reply."""
        state = self.automaton(n_marks)[0].get_initial_state()
        out = torch.zeros(len(tokens), self.vocab_size, dtype=torch.bool)
        for t, tok in enumerate(tokens):
            out[t, torch.from_numpy(self.allowed(n_marks, state, t))] = True
            if not out[t, tok]:  # outside the grammar, or past a budget (memory line, whole reply)
                raise ValueError(f"reply token {t} ({tok}) is not one the constrained sampler could write there: "
                                 f"constrained log-probs are only defined for such replies")
            if tok != self.eos:
                state = self.step(n_marks, state, tok)
        return out


class GrammarLogitsProcessor:
    """transformers LogitsProcessor: -inf on every token the grammar (and the budget) forbids, per batch row."""

    def __init__(self, grammar: ActionGrammar, n_marks: list[int], prompt_width: int):
        self.grammar, self.n_marks, self.width = grammar, n_marks, prompt_width
        self.states = [grammar.automaton(n)[0].get_initial_state() for n in n_marks]
        self.done = [False] * len(n_marks)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.width
        mask = torch.full_like(scores, float("-inf"))
        for row, n in enumerate(self.n_marks):
            if t > 0 and not self.done[row]:
                last = int(input_ids[row, -1])
                if last == self.grammar.eos:
                    self.done[row] = True
                else:
                    self.states[row] = self.grammar.step(n, self.states[row], last)
            if self.done[row]:
                mask[row] = 0  # finished rows only receive padding
            else:
                mask[row, torch.from_numpy(self.grammar.allowed(n, self.states[row], t))] = 0
        return scores + mask
