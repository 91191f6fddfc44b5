"""The book: every chapter follows the chapter conventions, and the book builds with no warning.

The build renders the committed notebook outputs (`execute_notebooks: "off"` in _config.yml),
so it needs no network and no training; it writes into a temporary folder, not into _build/.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
# The repository's URL lives in _config.yml (it also builds the book's launch and repository
# buttons); every badge and install cell must name the same one.
REPOSITORY = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
GITHUB = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+")
COLAB = (f"https://colab.research.google.com/github/{REPOSITORY['url'].removeprefix('https://github.com/')}"
         f"/blob/{REPOSITORY['branch']}/book/{{}}")
INSTALL = f'%pip install -q "mdm-lite @ git+{REPOSITORY["url"]}"'
MAX_NOTEBOOK_BYTES = 1_000_000


def _toc_files(entry) -> list[str]:
    """Every `file:` (and the `root:`) of a _toc.yml, in reading order, parts and sections included."""
    if isinstance(entry, list):
        return [f for item in entry for f in _toc_files(item)]
    if not isinstance(entry, dict):
        return []
    own = [entry[key] for key in ("root", "file") if key in entry]
    return own + [f for key in ("parts", "chapters", "sections") for f in _toc_files(entry.get(key, []))]


TOC = _toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text()))
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))


def _source(path: Path) -> Path | None:
    """The file a toc entry (written without suffix) names, or None."""
    found = [path.with_suffix(s) for s in (".ipynb", ".md", ".rst") if path.with_suffix(s).is_file()]
    return found[0] if found else None


def test_every_toc_entry_names_an_existing_page():
    missing = [entry for entry in TOC if _source(ROOT / entry) is None]
    assert not missing, f"_toc.yml lists pages that do not exist: {missing}"


def test_every_page_under_book_is_in_the_toc():
    pages = {p.relative_to(ROOT).with_suffix("").as_posix() for p in BOOK.iterdir() if p.suffix in (".ipynb", ".md", ".rst")}
    assert pages - set(TOC) == set(), "pages the book would silently leave out; add them to _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_follows_the_conventions(path: Path):
    """Colab badge to itself, a no-op install cell, quick mode read first, outputs of one full run."""
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown"
    assert COLAB.format(path.name) in "".join(cells[0]["source"]), "first cell needs the Colab badge for this file"
    code = [c for c in cells if c["cell_type"] == "code"]
    install, setup = ("".join(c["source"]) for c in code[:2])
    assert "import mdm_lite" in install and "except ImportError" in install and INSTALL in install
    assert 'os.environ.get("MDM_QUICK", "0") == "1"' in setup
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), f"outputs must come from one top-to-bottom run, got {counts}"
    setup_text = "".join("".join(o.get("text", "")) for o in code[1]["outputs"])
    assert "quick mode: False" in setup_text, "commit the outputs of a full run (MDM_QUICK unset)"
    errors = [o["ename"] for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name} was committed with errors: {errors}"


# Chapters 1 to 9 end with a summary and exercises and draw text that is readable in the HTML;
# chapters 2 to 7 build a part inline before asserting that it equals the package's.
CHAPTERS = [BOOK / f"{name}.ipynb" for name in ("01_data_and_text", "02_noise_schedule", "03_unet", "04_nesting",
                                                 "05_multires_loss", "06_full_model", "07_sampling", "08_scaling_up",
                                                 "09_nested_vs_flat")]
# Per chapter, the assertion that its inline version of a part equals the package's (pieces of its code).
AGREEMENT = {
    "02_noise_schedule.ipynb": ["torch.testing.assert_close(simple_cosine_logsnr(t), cosine_logsnr(t))",
                                "torch.testing.assert_close(simple_shifted_logsnr(t, r, 32), shifted_cosine_logsnr("],
    "03_unet.ipynb": ["ours.load_state_dict(block.state_dict())", "torch.testing.assert_close(ours(x, e), block(x, e))"],
    "04_nesting.ipynb": ["ours.load_state_dict(", "torch.testing.assert_close(a, b)"],
    "05_multires_loss.ipynb": ["assert torch.equal(mine[0], theirs[0])"],
    "06_full_model.ipynb": ["torch.testing.assert_close(theirs, ours, rtol=0, atol=0)"],
    "07_sampling.ipynb": ["torch.testing.assert_close(ddim_step_inline(", "torch.testing.assert_close(ddpm_step_inline("],
}
MIN_FONT_SIZE = 10  # points; smaller figure text is hard to read in the HTML book


def _cells(path: Path, kind: str) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


def _sections(path: Path) -> list[str]:
    """The level-2 headings of a notebook's markdown, in order (not the lines of code blocks)."""
    headings = []
    for text in _cells(path, "markdown"):
        fenced = False
        for line in text.splitlines():
            fenced ^= line.lstrip().startswith("```")
            if not fenced and line.startswith("## "):
                headings.append(line.strip())
    return headings


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_ends_with_a_summary_then_exercises(path: Path):
    assert _sections(path)[-2:] == ["## Summary", "## Exercises"], _sections(path)


@pytest.mark.parametrize("name", AGREEMENT)
def test_chapter_asserts_that_its_inline_part_equals_the_package(name: str):
    code = "\n".join(_cells(BOOK / name, "code"))
    missing = [piece for piece in AGREEMENT[name] if piece not in code]
    assert not missing, f"{name} lost its agreement check: {missing}"


@pytest.mark.parametrize("path", [BOOK / "00_introduction.ipynb", *CHAPTERS], ids=lambda p: p.name)
def test_figure_text_is_at_least_ten_points(path: Path):
    sizes = [float(size) for code in _cells(path, "code") for size in re.findall(r"fontsize=([0-9.]+)", code)]
    assert all(size >= MIN_FONT_SIZE for size in sizes), sorted(sizes)


def test_chapters_draw_images_with_the_package_helper_not_their_own():
    own = [p.name for p in [BOOK / "00_introduction.ipynb", *CHAPTERS] for code in _cells(p, "code")
           if re.search(r"^def (show|grid|show_levels|image_rows)\(", code, re.M)]
    assert not own, f"use mdm_lite.show_images instead of a helper of the chapter's own: {own}"


def test_every_repository_link_of_the_book_and_readme_is_the_one_in_config():
    assert GITHUB.fullmatch(REPOSITORY["url"]), "_config.yml: repository.url must be https://github.com/OWNER/NAME"
    pages = [*NOTEBOOKS, *BOOK.glob("*.md"), ROOT / "README.md"]
    links = {(page.name, link) for page in pages for link in GITHUB.findall(page.read_text())}
    assert links and {link for _, link in links} == {REPOSITORY["url"]}, sorted(links)


def _jupyter_book() -> str:
    return str(Path(sys.executable).with_name("jupyter-book"))


@pytest.mark.book
def test_book_builds_without_warnings(tmp_path: Path):
    result = subprocess.run(
        [_jupyter_book(), "build", str(ROOT), "--path-output", str(tmp_path), "--warningiserror", "--keep-going"],
        capture_output=True, text=True, timeout=300,
    )
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if re.search(r"WARNING|ERROR", line)]
    assert result.returncode == 0 and not warnings, "\n".join(warnings) or log[-3000:]
    html = tmp_path / "_build" / "html"
    missing = [entry for entry in TOC if not (html / f"{entry}.html").is_file()]
    assert not missing, f"no HTML for {missing}"


MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|home|root|work|Users|private|var/folders|content)/")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_print_no_path_of_the_authors_machine(path: Path):
    cells = json.loads(path.read_text())["cells"]
    texts = ["".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
             for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
    found = sorted({m.group(0) for text in texts for m in MACHINE_PATH.finditer(text)})
    assert not found, f"{path.name} prints paths of the machine it ran on ({found}): run it in a scratch folder"
