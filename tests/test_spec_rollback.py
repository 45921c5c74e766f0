"""Rollback after verification keeps the pool, the tables and the prefix cache consistent: the block
pool machine gains draft / accept / reject steps (drafts get slots but are never hashed; what
verification rejects is dropped, whole blocks freed)."""

from hypothesis import settings, strategies as st
from hypothesis.stateful import invariant, precondition, rule

from test_block_pool import PoolMachine


class SpecPoolMachine(PoolMachine):
    """PoolMachine plus speculative steps, played as the engine plays them: the request's last token
    and k drafts are written in one step, verification keeps ``accepted`` drafts and one token of the
    target's own, and the cache rolls back to every token but that last one, which the next step
    writes."""

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), token=st.integers(0, 5), drafts=st.lists(st.integers(0, 5), min_size=1, max_size=9),
          accepted=st.integers(0, 9), bonus=st.integers(0, 5))
    def speculate(self, i, token, drafts, accepted, bonus):
        r = self.live[i % len(self.live)]
        accepted = min(accepted, len(drafts))
        r.all_token_ids.append(token)  # sampled last step: no KV yet
        start = r.num_computed_tokens
        if not self.kv.allocate_slots(r, 1 + len(drafts), num_provisional=len(drafts)):
            r.all_token_ids.pop()
            self.kv.take_pending_copies()
            return
        for src, dst in self.kv.take_pending_copies():
            self.contents[dst] = list(self.contents[src])
        for table in r.block_tables:
            for pos, t in enumerate([token] + drafts, start=start):
                self.contents[table[pos // self.block_size]][pos % self.block_size] = t
        self.step_start[r.request_id] = start
        r.num_computed_tokens += 1 + len(drafts)
        # verification: the accepted drafts, then the target's own token
        r.all_token_ids.extend(drafts[:accepted] + [bonus])
        self.kv.rollback(r, r.num_tokens - 1, verified_from=start + 1)
        assert r.num_computed_tokens == r.num_tokens - 1
        # the next step writes the bonus token (the machine keeps every request fully computed)
        if self.kv.allocate_slots(r, 1):
            self._write(r, r.num_computed_tokens, r.num_tokens)
            r.num_computed_tokens += 1
        else:
            r.all_token_ids.pop()
            self.kv.take_pending_copies()

    @invariant()
    def no_hash_covers_a_token_without_verified_kv(self):
        for r in self.live:
            assert len(r.block_hashes) <= r.num_computed_tokens // self.block_size


class WindowedSpecPoolMachine(SpecPoolMachine):
    """The same on a hybrid model: one full-attention group and two 6-token sliding ones."""

    windows = (6, None, 6)


TestSpecPoolMachine = SpecPoolMachine.TestCase
TestSpecPoolMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestWindowedSpecPoolMachine = WindowedSpecPoolMachine.TestCase
TestWindowedSpecPoolMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
