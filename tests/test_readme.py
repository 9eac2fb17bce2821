"""Every ```python block of README.md runs as written, on the shipped demo models instead of hub checkpoints.

The only change made to a block before it runs: a hub id given to ``from_pretrained`` (e.g.
``"llava-hf/llava-1.5-7b-hf"``) becomes the directory of the shipped demo model of that family
(``vtprune/assets/llava``), because nothing can be downloaded here; a hub id without a stand-in fails the test.

Two kinds of block:

* a **program** (the Quickstart) runs top to bottom in an empty namespace, exactly as a user would paste it;
* an **API listing** (the blocks under the headings in :data:`LISTING_SECTIONS`) shows alternative calls one per
  line and continues from the Quickstart. Its top-level statements run in order in the namespace the Quickstart
  leaves before its first ``prune`` (``vtprune``, an unpruned ``model``, ``processor``, ``image``, ``prompt``,
  ``inputs``). Statements are alternatives, so a statement that calls ``vtprune.prune`` first unprunes the model
  if an earlier line left it pruned, and afterwards runs the Quickstart's own call
  ``model.generate(**inputs, ...)`` (no ``torch.no_grad``: the README promises unchanged user code) so that the
  configuration is exercised, not only validated. Every failing statement is reported, then the test fails.

No skips and no expected failures: a README line that raises is a failing test.
"""

from __future__ import annotations

import ast
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

import vtprune
from vtprune.demo_models import build_prompt, model_dir
from vtprune.synth import item

README = Path(__file__).resolve().parents[1] / "README.md"
#: hub id in the README -> shipped demo model of the same family
HUB_IDS = {"llava-hf/llava-1.5-7b-hf": "llava"}
#: headings whose python blocks are API listings (alternatives, one per line) rather than programs
LISTING_SECTIONS = ("Stages", "API")
_FROM_PRETRAINED = re.compile(r"""from_pretrained\(\s*(["'])([^"']+)\1""")


@dataclass(frozen=True)
class Block:
    line: int  # README line of the block's first code line
    section: str  # nearest heading above it
    code: str

    @property
    def listing(self) -> bool:
        return self.section in LISTING_SECTIONS


def python_blocks(text: str) -> list[Block]:
    """Every ```python fenced block of ``text``, with its first code line number and section heading (``#`` lines
    inside any fenced block, e.g. shell comments, are not headings)."""
    blocks: list[Block] = []
    section, fence, start, buf = "", None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence, start, buf = line[3:].strip(), n + 1, []
            elif line.startswith("#"):
                section = line.lstrip("#").strip()
        elif line.strip() == "```":
            if fence == "python":
                blocks.append(Block(start, section, "\n".join(buf) + "\n"))
            fence = None
        else:
            buf.append(line)
    assert fence is None, f"README.md: the ```{fence} block opened at line {start - 1} is never closed"
    return blocks


def substitute_hub_ids(code: str) -> str:
    """``from_pretrained("<hub id>")`` -> ``from_pretrained("<shipped demo model dir>")``."""

    def local(m: re.Match[str]) -> str:
        hub_id = m.group(2)
        if hub_id not in HUB_IDS:
            raise AssertionError(f"README loads {hub_id!r}, which has no shipped stand-in; valid: {sorted(HUB_IDS)}")
        return f"from_pretrained({str(model_dir(HUB_IDS[hub_id]))!r}"

    return _FROM_PRETRAINED.sub(local, code)


def compiled(block: Block) -> ast.Module:
    """The block's code, hub ids substituted, parsed with README line numbers (tracebacks point into README.md)."""
    return ast.parse("\n" * (block.line - 1) + substitute_hub_ids(block.code), filename=str(README))


BLOCKS = python_blocks(README.read_text())


def test_readme_has_the_blocks_this_test_knows():
    sections = [b.section for b in BLOCKS]
    assert sections[0] == "Quickstart" and not BLOCKS[0].listing
    assert all(s in sections for s in LISTING_SECTIONS), sections
    assert "vtprune.prune(" in BLOCKS[0].code and "model.generate(**inputs" in BLOCKS[0].code


def test_hub_ids_become_the_shipped_demo_models():
    code = 'AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")\nx = "a/b"\n'
    assert substitute_hub_ids(code) == f"AutoProcessor.from_pretrained({str(model_dir('llava'))!r})\nx = \"a/b\"\n"
    with pytest.raises(AssertionError, match="'org/unknown-7b', which has no shipped stand-in"):
        substitute_hub_ids("M.from_pretrained('org/unknown-7b')")
    text = ("# T\n## Quickstart\n```python\na = 1\n```\n```bash\n# a shell comment, not a heading\n```\n"
            "```python\nb = 2\nc = 3\n```\n")
    assert python_blocks(text) == [Block(4, "Quickstart", "a = 1\n"), Block(10, "Quickstart", "b = 2\nc = 3\n")]


def _quickstart_namespace() -> dict:
    """What the listings continue from: the Quickstart's model, processor, image, prompt and inputs, unpruned."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir("llava"))
    processor = AutoProcessor.from_pretrained(model_dir("llava"))
    sample = item("heldout", 0)
    image, prompt = sample.image, build_prompt("llava", sample.qa.question)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    return {"vtprune": vtprune, "model": model, "processor": processor, "image": image, "prompt": prompt,
            "inputs": inputs}


def _calls_prune(stmt: ast.stmt) -> bool:
    return any(isinstance(n, ast.Call) and ast.unparse(n.func) == "vtprune.prune" for n in ast.walk(stmt))


def _run_listing(block: Block) -> list[str]:
    """Run a listing statement by statement (see the module docstring); return one message per failure."""
    ns = _quickstart_namespace()
    model, inputs = ns["model"], ns["inputs"]
    failures = []
    for stmt in compiled(block).body:
        prunes = _calls_prune(stmt)
        if prunes and vtprune.is_pruned(model):
            vtprune.unprune(model)  # the lines are alternatives, not a sequence of prunes
        step = "the line itself"
        try:
            exec(compile(ast.Module([stmt], type_ignores=[]), str(README), "exec"), ns)
            if prunes:
                step = "model.generate(**inputs) after it"
                model.generate(**inputs, max_new_tokens=2)  # prefill and one cached decoding step
        except Exception as e:  # every failing line is collected, then reported together
            failures.append(f"README.md:{stmt.lineno}: {ast.unparse(stmt)}\n    {step} raised "
                            f"{type(e).__name__}: {e}\n{_where_raised(e)}")
    return failures


def _where_raised(e: BaseException) -> str:
    """The innermost frame of ``e`` (where in vtprune/transformers it failed), indented."""
    tb = traceback.extract_tb(e.__traceback__)
    return f"    at {tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name}" if tb else ""


def _run_program(block: Block) -> None:
    """A program: as written, in a fresh namespace; an exception propagates with a README traceback."""
    exec(compile(compiled(block), str(README), "exec"), {"__name__": "__readme__"})


def test_failing_lines_fail_the_test_and_each_is_reported():
    listing = Block(1, "API", 'vtprune.prune(model, method="fastv", keep=64, layer=99)\nvtprune.list_methods()\n'
                              "undefined_name\n")
    failures = _run_listing(listing)
    assert len(failures) == 2  # the good line between them ran; the run went on after the first failure
    assert failures[0].startswith("README.md:1: ") and "the line itself raised ValueError" in failures[0]
    assert "llm:99" in failures[0]
    assert failures[1].startswith("README.md:3: undefined_name") and "NameError" in failures[1]
    with pytest.raises(ZeroDivisionError):
        _run_program(Block(1, "Quickstart", "x = 1\ny = x / 0\n"))


@pytest.mark.parametrize("block", BLOCKS, ids=[f"L{b.line}-{b.section.replace(' ', '_')}" for b in BLOCKS])
def test_readme_python_block_runs(block: Block):
    if not block.listing:
        _run_program(block)
        return
    failures = _run_listing(block)
    assert not failures, f"{len(failures)} README line(s) under '{block.section}' fail:\n" + "\n".join(failures)
