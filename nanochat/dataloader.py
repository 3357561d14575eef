"""
The pretraining data loader: reads shards, tokenizes in background threads, and packs documents into rows.

Packing is BOS-aligned best-fit: every row starts with a document's BOS and is filled by repeatedly taking the
largest buffered document that fits entirely; only when none fits is the shortest one cropped to fill the row.
No padding, so every token is trained on; the price is the cropped tails (~35% of tokens at T=2048, vs ~39% for
plain greedy cropping). Rank r reads row groups r, r+W, r+2W... so ranks never see the same document.

Resume is exact: the state yielded with each batch holds the reading position and the identities of the buffered
documents, and a loader started from it yields exactly the batches an uninterrupted loader would have yielded next.
With another number of ranks, resplit_states restarts every rank from where the least advanced one was.
"""

import bisect
import itertools
import queue
import threading
from collections import defaultdict

import numpy as np
import torch

from nanochat.common import UserError, get_dist_info
from nanochat.dataset import open_shard, read_texts, split_files

STATE_MISMATCH = ("the loader state does not match the shards on disk (they changed since it was saved): put back the "
                  "shards it was saved with, or start the run afresh without resuming")


def to_device(array, device):
    """A numpy batch as a tensor on device: on CUDA one pinned host buffer and one async copy (the caching host
    allocator keeps the buffer alive until the copy ends)."""
    batch = torch.from_numpy(array)
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch if device.type == "cpu" else batch.to(device)


def document_chunks(files, position, rank, world_size, chunk_docs, epochs=None):
    """
    Yield (doc_ids, texts, next_position) epoch after epoch, forever or until `epochs` are read. A doc id is
    (pq_idx, rg_idx, row); a position is (epoch, pq_idx, rg_idx, row) of the next document to read.
    """
    epoch, pq_start, rg_start, row_start = position
    while True:
        full_epoch = (pq_start, rg_start, row_start) == (0, rank, 0)
        produced = False
        for pq_idx in range(pq_start, len(files)):
            pf = open_shard(files[pq_idx])
            for rg_idx in range(rg_start, pf.num_row_groups, world_size):
                texts = read_texts(pf, rg_idx, files[pq_idx])
                for start in range(row_start, len(texts), chunk_docs):
                    end = min(start + chunk_docs, len(texts))
                    after = (epoch, pq_idx, rg_idx, end) if end < len(texts) else (epoch, pq_idx, rg_idx + world_size, 0)
                    yield [(pq_idx, rg_idx, r) for r in range(start, end)], texts[start:end], after
                    produced = True
                row_start = 0
            rg_start = rank
        if full_epoch and not produced:
            raise UserError(f"rank {rank} of {world_size} got no documents: the split has fewer row groups "
                            f"({len(files)} shards) than ranks; add data or use fewer ranks")
        if epochs is not None and epoch >= epochs:
            return
        epoch, pq_start = epoch + 1, 0


def encode_documents(tokenizer, doc_ids, texts, fim=None, threads=8):
    """Each document's tokens, <bos> first: as written, or through the FIM transform (nanochat/fim.py), whose choices
    are seeded by the documents' ids."""
    if fim is not None:
        return fim.encode(doc_ids, texts, threads)
    return tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id(), num_threads=threads)


def _tokenize_ahead(chunks, tokenizer, threads, out, stop, fim=None):
    """
    Background thread: tokenize chunks (tiktoken releases the GIL) and queue them in order, then None at the end.
    It ends when the loader is closed or the main thread exits, so an abandoned loader never blocks shutdown.
    """
    def running():
        return not stop.is_set() and threading.main_thread().is_alive()

    def put(item):
        while running():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                pass
    try:
        for doc_ids, texts, after in chunks:
            if not running():
                return
            tokens = encode_documents(tokenizer, doc_ids, texts, fim, threads)
            put((doc_ids, [np.array(t, dtype=np.int32) for t in tokens], after))
        put(None)
    except BaseException as e:  # hand any failure to the consumer, which re-raises it
        put(e)


def _check_position(files, position, world_size):
    """A saved reading position points into a row group, or just past a shard's last one (that shard is done)."""
    _, pq_idx, rg_idx, row = position
    if not 0 <= pq_idx < len(files) or rg_idx < 0 or row < 0:
        raise UserError(STATE_MISMATCH)
    meta = open_shard(files[pq_idx]).metadata
    inside = rg_idx < meta.num_row_groups and row < meta.row_group(rg_idx).num_rows
    if not (inside or meta.num_row_groups <= rg_idx < meta.num_row_groups + world_size and row == 0):
        raise UserError(STATE_MISMATCH)


def resplit_states(states, world_size):
    """
    Loader states for world_size ranks from the states of a run with another number of ranks (one per rank, in
    rank order): every new rank starts at the block of row groups the least advanced old rank was reading (a block:
    row groups b*W .. b*W+W-1 of one shard, W the old world size), rank r at row group b*W + r, then every
    world_size-th. Nothing after that point is skipped; what the other old ranks had read beyond it is read again,
    and their buffered documents are dropped (at most a buffer and a block of row groups per old rank).
    """
    old_world = len(states)
    epoch, pq_idx, block = min((s["epoch"], s["pq_idx"], s["rg_idx"] // old_world) for s in states)
    return [{"epoch": epoch, "pq_idx": pq_idx, "rg_idx": block * old_world + rank, "row": 0, "rank": rank,
             "world_size": world_size, "buffer": [], "resplit_from": old_world} for rank in range(world_size)]


def _restore_buffer(files, doc_ids, tokenizer, fim=None):
    """Re-read and re-tokenize the buffered documents named in a saved state, in their saved order."""
    wanted = defaultdict(list)
    for pq_idx, rg_idx, row in doc_ids:
        wanted[(pq_idx, rg_idx)].append(row)
    texts = {}
    for (pq_idx, rg_idx), rows in wanted.items():
        if not 0 <= pq_idx < len(files):
            raise UserError(STATE_MISMATCH)
        pf = open_shard(files[pq_idx])
        if not 0 <= rg_idx < pf.num_row_groups:
            raise UserError(STATE_MISMATCH)
        group = read_texts(pf, rg_idx, files[pq_idx])
        for row in rows:
            if not 0 <= row < len(group):
                raise UserError(STATE_MISMATCH)
            texts[(pq_idx, rg_idx, row)] = group[row]
    tokens = encode_documents(tokenizer, doc_ids, [texts[tuple(i)] for i in doc_ids], fim)
    return [np.array(t, dtype=np.int32) for t in tokens]


def tokenizing_distributed_data_loader(tokenizer, B, T, split, device="cpu", resume_state=None, tokenizer_threads=4,
                                       tokenizer_batch_size=128, buffer_size=1000, data_dir=None, rank=None, world_size=None,
                                       epochs=None, fim_rate=0.0, fim_spm_rate=0.5):
    """
    Yield (inputs, targets, state): inputs and targets are (B, T) int64 on device, targets shifted by one.
    Forever, or with epochs=N until N passes over this rank's documents are used up (evaluation: one pass), the last
    batch padded with targets -1. Pass a yielded state as resume_state to continue right after that batch.
    rank/world_size default to torchrun's. fim_rate: the share of documents rearranged for fill-in-the-middle
    (nanochat/fim.py), SPM with probability fim_spm_rate; train split only, so val bpb stays comparable.
    """
    fim = None
    if fim_rate > 0:
        if split != "train":
            raise ValueError(f"fill-in-the-middle rearranges training documents only, not the {split} split")
        from nanochat.fim import FimTransform
        fim = FimTransform(tokenizer, fim_rate, fim_spm_rate)  # a tokenizer without the FIM tokens: one line
    if rank is None:
        _, rank, _, world_size = get_dist_info()
    device = torch.device(device)
    files = split_files(split, data_dir)
    position, buffered_ids = (1, 0, rank, 0), []
    if resume_state is not None:
        if (resume_state["rank"], resume_state["world_size"]) != (rank, world_size):
            raise UserError(f"the loader state is for rank {resume_state['rank']} of {resume_state['world_size']}, "
                            f"not rank {rank} of {world_size}: resume with the same number of processes")
        position = tuple(resume_state[k] for k in ("epoch", "pq_idx", "rg_idx", "row"))
        buffered_ids = [tuple(i) for i in resume_state["buffer"]]
        # a resplit position may lie up to old + new world size row groups past a shard's end
        _check_position(files, position, resume_state.get("resplit_from", 0) + world_size)

    # the buffer: documents sorted by length (ties in arrival order), so best-fit is a binary search
    docs = _restore_buffer(files, buffered_ids, tokenizer, fim) if buffered_ids else []
    lengths = [len(d) for d in docs]
    if lengths != sorted(lengths):  # other documents at the same places
        raise UserError(STATE_MISMATCH)

    chunks = queue.Queue(maxsize=4)
    stop = threading.Event()
    reader = document_chunks(files, position, rank, world_size, tokenizer_batch_size, epochs)
    threading.Thread(target=_tokenize_ahead, args=(reader, tokenizer, tokenizer_threads, chunks, stop, fim)).start()

    exhausted = False

    def refill():
        nonlocal position, exhausted
        while len(docs) < buffer_size and not exhausted:
            item = chunks.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                exhausted = True
                return
            new_ids, new_docs, position = item
            for doc_id, doc in zip(new_ids, new_docs):
                i = bisect.bisect_right(lengths, len(doc))
                lengths.insert(i, len(doc))
                docs.insert(i, doc)
                buffered_ids.insert(i, doc_id)

    row_len = T + 1
    try:
        while True:
            rows = np.full((B, row_len), tokenizer.get_bos_token_id(), dtype=np.int64)
            filled = np.zeros(B, dtype=np.int64)  # below row_len only once the documents ran out
            for b in range(B):
                while filled[b] < row_len:
                    refill()
                    if not docs:
                        break
                    room = row_len - filled[b]
                    i = bisect.bisect_right(lengths, room) - 1  # the largest document that fits entirely
                    if i < 0:
                        i = 0  # none fits: crop the shortest to fill the row exactly
                    doc = docs.pop(i)[:room]
                    del lengths[i], buffered_ids[i]
                    rows[b, filled[b]:filled[b] + len(doc)] = doc
                    filled[b] += len(doc)
            if filled[0] == 0:
                return  # the epochs asked for are used up
            targets = np.where(np.arange(1, row_len) < filled[:, None], rows[:, 1:], -1)
            both = to_device(np.stack([rows[:, :-1], targets]), device)  # (2, B, T): inputs, targets
            state = {"epoch": position[0], "pq_idx": position[1], "rg_idx": position[2], "row": position[3],
                     "rank": rank, "world_size": world_size, "buffer": [list(i) for i in buffered_ids]}
            yield both[0], both[1], state
    finally:
        stop.set()


def conversation_batches(tokenizer, dataset, B, T, device="cpu", rank=0, world_size=1, buffer_size=100, epochs=None,
                         all_tokens=False):
    """
    The finetuning loader. Yield (inputs, targets, info) forever, or with epochs=N until N passes are used up
    (evaluation: one pass); info = {"epoch", "progress"} (progress counts epochs: 1.0 = one pass over the dataset).
    Rows are packed best-fit with whole conversations (none is cropped to fit a row: the row is padded instead),
    targets are -1 wherever the loss should not look: user turns, tool outputs, padding (with all_tokens, as in
    midtraining, only padding). A conversation longer than a row is truncated to the row, so small --max-seq-len
    still trains.
    """
    device = torch.device(device)
    row_len, bos, n = T + 1, tokenizer.get_bos_token_id(), len(dataset)

    def rendered():
        epoch = 1
        while True:
            for i in range(rank, n, world_size):
                ids, mask = tokenizer.render_conversation(dataset[i], max_tokens=row_len)
                if all_tokens:
                    mask = [1] * len(ids)
                yield ids, mask, epoch - 1 + (i + 1) / n
            if epoch == epochs:
                return
            epoch += 1

    stream = rendered()
    buffer, progress = [], 0.0
    while True:
        tokens = np.full((B, row_len), bos, dtype=np.int64)
        masks = np.zeros((B, row_len), dtype=np.int64)
        placed = 0
        for b in range(B):
            filled = 0
            while filled < row_len:
                for ids, mask, progress in itertools.islice(stream, buffer_size - len(buffer)):
                    buffer.append((ids, mask))
                room = row_len - filled
                fits = [i for i, (ids, _) in enumerate(buffer) if len(ids) <= room]
                if not fits:
                    break  # pad the rest of the row (or the data ran out)
                ids, mask = buffer.pop(max(fits, key=lambda i: len(buffer[i][0])))
                tokens[b, filled:filled + len(ids)] = ids
                masks[b, filled:filled + len(ids)] = mask
                filled += len(ids)
                placed += 1
        if not placed:
            return  # the epochs asked for are used up
        targets = np.where(masks[:, 1:] == 1, tokens[:, 1:], -1)
        both = to_device(np.stack([tokens[:, :-1], targets]), device)
        yield both[0], both[1], {"epoch": int(progress) + 1, "progress": progress}
