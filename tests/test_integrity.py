"""What an index guarantees to the people who share it: concurrent use equals sequential use, and damaged
or odd input ends in one clear line instead of a wrong answer."""

import random
import threading

import numpy as np

WORDS = "the king of the north wrote a book music by old composer red blue river".split()


def mixed_queries(n: int, seed: int = 0) -> list[tuple[str, str, dict]]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        completion = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        options = dict(k=3, opponents=i % 2 == 1, per_token=i % 3 == 0, cosine=i % 5 == 0, distinct=i % 7 == 0,
                       candidates=("index", "tfidf", "hybrid")[i % 3], k1=rng.choice([8, 30]), k2=rng.choice([4, 10]))
        jobs.append((prompt, completion, options))
    return jobs


def answer(index, job) -> list:
    result = index.query(job[0], job[1], **job[2])
    return [(h.row, h.score, h.approx_score, tuple(h.token_scores or ()), tuple(h.copies)) for h in result.hits] + [result.expected_missed]


def test_one_index_shared_by_8_threads_answers_exactly_as_sequentially(index):
    flags = [p.requires_grad for p in index.lm.model.parameters()]
    jobs = mixed_queries(400)
    sequential = [answer(index, job) for job in jobs]
    concurrent: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        for i in range(t, len(jobs), 8):
            try:
                concurrent[i] = answer(index, jobs[i])
            except BaseException as e:  # noqa: BLE001 - every failure is reported below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert concurrent == sequential
    assert [p.requires_grad for p in index.lm.model.parameters()] == flags  # nothing left frozen behind
    assert np.isfinite([row[1] for a in sequential for row in a[:-1]]).all()
