import json
import os
import pathlib
import re

import pytest
import torch

from conftest import make_docs
from nanochat import dataset
from nanochat.common import UserError
from nanochat.dataloader import document_chunks, resplit_states, tokenizing_distributed_data_loader
from test_dataset import DAMAGE, DAMAGE_ERRORS, damage_shard

B, T = 4, 64


@pytest.fixture
def data_dir(tmp_path):
    docs = make_docs(1200, seed=7, min_words=2, max_words=60)
    out = tmp_path / "shards"
    out.mkdir()
    # two train shards (several row groups each) and a val shard
    dataset.write_shard(docs[:500], str(out / dataset.shard_name(0)))
    dataset.write_shard(docs[500:1100], str(out / dataset.shard_name(1)))
    dataset.write_shard(docs[1100:], str(out / dataset.shard_name(2)))
    return str(out)


def loader(tokenizer, data_dir, batch_size=B, **kwargs):
    kwargs = {"buffer_size": 50, "tokenizer_batch_size": 16, "data_dir": data_dir, **kwargs}
    return tokenizing_distributed_data_loader(tokenizer, batch_size, T, "train", **kwargs)


def segments(tokenizer, row):
    """Split a row into its documents (each starts with BOS) and decode them."""
    bos = tokenizer.get_bos_token_id()
    starts = [i for i, t in enumerate(row) if t == bos]
    return [tokenizer.decode(row[a + 1:b]) for a, b in zip(starts, starts[1:] + [len(row)])]


def test_rows_are_bos_aligned_and_fully_packed(tokenizer, data_dir):
    it = loader(tokenizer, data_dir)
    for _ in range(10):
        x, y, state = next(it)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == tokenizer.get_bos_token_id()).all()
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert int(x.max()) < tokenizer.get_vocab_size() and int(x.min()) >= 0  # no padding ids
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            docs = segments(tokenizer, row)
            # best fit: only the row's last document may be cropped; all the others are whole
            assert all(d.startswith("doc") and d.endswith(" END.") for d in docs[:-1])
    json.dumps(state)  # the state goes into a checkpoint's JSON meta


def test_ranks_read_disjoint_documents(tokenizer, data_dir):
    files = dataset.split_files("train", data_dir)
    seen = []
    for rank in range(3):
        ids = []
        for doc_ids, _, after in document_chunks(files, (1, 0, rank, 0), rank, 3, chunk_docs=16):
            if after[0] > 1:
                break  # one full epoch
            ids += doc_ids
        seen.append(set(ids))
    assert all(seen) and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert sum(map(len, seen)) == 1100

    # and the same through the loader: the document markers in the batches never overlap between ranks
    markers = []
    for rank in range(2):
        it = loader(tokenizer, data_dir, rank=rank, world_size=2)
        found = set()
        for _ in range(5):
            x, _, _ = next(it)
            for row in x.tolist():
                found |= {m for d in segments(tokenizer, row) for m in re.findall(r"^doc(\d{5})", d)}
        markers.append(found)
    assert markers[0] and markers[1] and not markers[0] & markers[1]


@pytest.mark.parametrize("resume_after", [0, 7, 23])
def test_resumed_loader_equals_uninterrupted(tokenizer, data_dir, resume_after):
    uninterrupted = loader(tokenizer, data_dir, batch_size=32)
    batches, states = [], []
    for _ in range(resume_after + 30):  # 30+ batches cross the epoch boundary (1100 documents)
        x, y, state = next(uninterrupted)
        batches.append((x, y))
        states.append(json.loads(json.dumps(state)))
    assert states[resume_after]["epoch"] < states[-1]["epoch"]  # the resumed stretch crosses an epoch boundary
    resumed = loader(tokenizer, data_dir, batch_size=32, resume_state=states[resume_after])
    for x, y in batches[resume_after + 1:]:
        rx, ry, _ = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resume_with_another_world_size_is_refused(tokenizer, data_dir):
    _, _, state = next(loader(tokenizer, data_dir))
    with pytest.raises(UserError, match="same number of processes"):
        next(loader(tokenizer, data_dir, resume_state=state, rank=0, world_size=2))


@pytest.mark.parametrize("new_world", [1, 3])
def test_resplit_states_read_everything_after_the_least_advanced_rank_once(tokenizer, data_dir, new_world):
    """Positions of 2 ranks (rank 1 further on) re-split for another number: from the block of row groups rank 0 was
    in, every document is read by exactly one new rank, and each new loader starts from its state."""
    files = dataset.split_files("train", data_dir)
    states = []
    for rank, batches in ((0, 2), (1, 12)):
        it = loader(tokenizer, data_dir, rank=rank, world_size=2)
        for _ in range(batches):
            _, _, state = next(it)
        it.close()
        states.append(state)
    assert (states[0]["pq_idx"], states[0]["rg_idx"] // 2) < (states[1]["pq_idx"], states[1]["rg_idx"] // 2)
    new = resplit_states(states, new_world)
    read = []
    for state in new:
        position = tuple(state[k] for k in ("epoch", "pq_idx", "rg_idx", "row"))
        for ids, _, _ in document_chunks(files, position, state["rank"], new_world, 16, epochs=state["epoch"]):
            read.extend(ids)
        next(loader(tokenizer, data_dir, rank=state["rank"], world_size=new_world, resume_state=state))
    start = (states[0]["pq_idx"], states[0]["rg_idx"] // 2 * 2)
    expected = []
    for pq_idx, path in enumerate(files):
        meta = dataset.open_shard(path).metadata
        expected += [(pq_idx, rg, row) for rg in range(meta.num_row_groups) if (pq_idx, rg) >= start
                     for row in range(meta.row_group(rg).num_rows)]
    assert len(read) == len(set(read)) and sorted(read) == expected and len(expected) > 100


def test_more_ranks_than_row_groups_is_a_clear_error(tokenizer, data_dir):
    with pytest.raises(UserError, match="fewer row groups"):
        next(tokenizing_distributed_data_loader(tokenizer, B, T, "val", data_dir=data_dir, rank=9, world_size=10))


def test_one_pass_reads_every_document_once_then_stops(tokenizer, data_dir):
    """Evaluation's loader (epochs=1): each val document starts once, then it ends; padding is targets -1."""
    batches = list(tokenizing_distributed_data_loader(tokenizer, B, T, "val", data_dir=data_dir, epochs=1,
                                                      buffer_size=50, tokenizer_batch_size=16))
    bos, starts, markers = tokenizer.get_bos_token_id(), 0, []
    for x, y, _ in batches:
        assert (x[:, 0] == bos).all()
        for row, targets in zip(x.tolist(), y.tolist()):
            valid = [t for t in targets if t >= 0]
            assert targets == valid + [-1] * (len(targets) - len(valid))  # padding only at the end of a row
            content = (row + targets[-1:])[:len(valid) + 1] if valid else []  # a row of padding only: nothing
            starts += content.count(bos)
            markers += re.findall(r"doc(\d{5})", tokenizer.decode(content))
    # the val shard's 100 documents, each begun once (best fit may crop one so short that its marker is cut)
    assert starts == 100 and len(markers) == len(set(markers)) > 80


def test_conversations_one_pass(tokenizer, tmp_path):
    from nanochat.dataloader import conversation_batches
    from tasks.customjson import CustomJSON
    path = tmp_path / "conversations.jsonl"
    path.write_text("\n".join(json.dumps([{"role": "user", "content": f"question {i}"},
                                          {"role": "assistant", "content": f"answer {i}"}]) for i in range(37)))
    batches = list(conversation_batches(tokenizer, CustomJSON(str(path)), B=2, T=32, buffer_size=8, epochs=1))
    answers = re.findall(r"answer (\d+)", "".join(tokenizer.decode(x.flatten().tolist()) for x, _, _ in batches))
    assert sorted(map(int, answers)) == list(range(37))


@pytest.mark.parametrize("change", ["removed", "shrunk"])
def test_resume_after_the_shards_changed_is_refused(tokenizer, data_dir, change):
    it = loader(tokenizer, data_dir)
    state = next(state for _, _, state in it if state["pq_idx"] == 1)  # reading the second train shard
    it.close()
    if change == "removed":  # the val shard moves up into the train split: too few files for the saved position
        os.remove(os.path.join(data_dir, dataset.shard_name(1)))
        dataset.write_shard(make_docs(50, seed=8), os.path.join(data_dir, dataset.shard_name(3)))
    else:  # the same files, fewer documents in each
        for i in (0, 1):
            dataset.write_shard(make_docs(20, seed=i), os.path.join(data_dir, dataset.shard_name(i)))
    with pytest.raises(UserError, match=r"^the loader state does not match the shards on disk \(they changed since it "
                                        r"was saved\): put back the shards it was saved with, or start the run afresh"):
        next(loader(tokenizer, data_dir, resume_state=state))


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_shard_stops_the_loader_with_one_error(tokenizer, data_dir, how):
    shard = pathlib.Path(data_dir, dataset.shard_name(1))
    damage_shard(shard, how)
    it = loader(tokenizer, data_dir)
    with pytest.raises(UserError, match=rf"^shard {shard} {DAMAGE_ERRORS[how]}.*: it is damaged or not a nanochat shard"):
        for _ in range(100):  # the first shard is read fine, then the damaged one is reached
            next(it)


def test_damaged_shard_named_when_restoring_the_buffer(tokenizer, data_dir):
    _, _, state = next(loader(tokenizer, data_dir))
    assert {pq_idx for pq_idx, _, _ in state["buffer"]} == {0}
    shard = os.path.join(data_dir, dataset.shard_name(0))
    dataset.write_shard([None] * 499 + ["the last"], shard)  # the same rows and row groups, the texts gone
    with pytest.raises(UserError, match=rf"^shard {shard} has \d+ null text\(s\) in row group 0"):
        next(loader(tokenizer, data_dir, resume_state=state))
