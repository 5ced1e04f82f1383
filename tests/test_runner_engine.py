"""The runner over the real engine (tiny parity checkpoint): pages are fed continuously, so staggered
answer lengths give the records of one page at a time, and a long answer does not hold back the pages
behind it (checked on the order the engine finished them, not on time)."""

from __future__ import annotations

from dataclasses import replace

from fakes import make_image
from parity import checkpoint_dir, parity_model, parity_processor
from PIL import Image

from dsvl2.model.engine import Engine
from dsvl2.model.requests import Completion, Request
from dsvl2.pipelines import runner
from dsvl2.pipelines.base import Document, Page, PageSize, Settings
from dsvl2.pipelines.ocr import OcrTask

LENGTHS = [40, 3, 5, 3, 4, 3]  # tokens each page's answer takes, set per request (the first one is long)


class Staggered:
    """An engine whose i-th request (in submission order) answers exactly LENGTHS[i] tokens; it notes the
    order completions come back in."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.finished = engine, []
        self.model_id, self.revision, self.max_batch_size = "tiny-mha", None, engine.max_batch_size
        self.submitted = 0

    def submit(self, request: Request) -> None:
        budget = LENGTHS[self.submitted]
        self.submitted += 1
        sampling = replace(request.sampling, max_new_tokens=budget, suppress_eos=True, no_repeat_ngram=0)
        self.engine.submit(replace(request, sampling=sampling))

    def step(self) -> list[Completion]:
        done = self.engine.step()
        self.finished += [c.id for c in done]
        return done

    @property
    def has_work(self) -> bool:
        return self.engine.has_work

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)


def _pages(tmp_path) -> list[Page]:
    doc = Document("doc", "doc", sha256="0" * 64, kind="image", n_pages=len(LENGTHS))
    pages = []
    for n in range(1, len(LENGTHS) + 1):
        image = Image.open(make_image(tmp_path / f"{n}.png", (60 + 10 * n, 50), ("white", "navy", "red")[n % 3]))
        pages.append(Page(doc, n, image.convert("RGB"), PageSize(*image.size)))
    return pages


def _run(engine: Engine, pages: list[Page], batch_size: int) -> tuple[list, Staggered]:
    runtime = Staggered(engine)
    events = list(
        runner.events(runtime=runtime, task=OcrTask(), pages=pages, settings=Settings(model="m"), batch_size=batch_size)
    )
    return [e.record for e in events if isinstance(e, runner.RecordDone)], runtime


def test_staggered_answers_equal_one_page_at_a_time_and_do_not_wait_for_the_long_one(tmp_path) -> None:
    ckpt = checkpoint_dir("tiny-mha")
    model, processor = parity_model("tiny-mha"), parity_processor("tiny-mha")
    assert ckpt.is_dir()
    pages = _pages(tmp_path)
    together, batched = _run(Engine(model, processor, max_batch_size=3), pages, batch_size=3)
    alone, _ = _run(Engine(model, processor, max_batch_size=1), pages, batch_size=1)
    assert [r.page for r in together] == list(range(1, len(LENGTHS) + 1))  # records in input order
    assert [(r.text, r.tokens["generated"]) for r in together] == [(r.text, r.tokens["generated"]) for r in alone]
    assert [r.tokens["generated"] for r in together] == LENGTHS
    # The long first answer finished last: every page behind it was admitted and answered while it ran.
    assert batched.finished[-1] == "r0", batched.finished
