"""`handgrad dojo ...`: the dojo's commands (list, start, grade, hint, solution; ask, answer, quiz),
each a few lines that call handgrad.dojo and print what it returns."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from handgrad import data, io
from handgrad.cli.common import UsageError
from handgrad.cli.common import err as _err


def _dojo_item(name: str):
    from handgrad import dojo

    try:
        return dojo.api.get(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_dojo_list(args) -> int:
    from handgrad import dojo

    exercises, others = dojo.items("exercise"), [it for it in dojo.items() if it.kind != "exercise"]
    w = max(len(it.slug) for it in exercises)
    for it in exercises:
        print(f"{it.key}  {it.slug:<{w}}  {it.about}")
    for it in others:
        print(f"{it.alias or '-'}  {it.key:<17}  {it.about}")
    _dojo_questions_list(args)
    return 0


def _cmd_dojo_start(args) -> int:
    from handgrad import dojo

    item = _dojo_item(args.exercise)
    try:
        path = dojo.start(item.key, args.dir)
    except FileExistsError:
        raise UsageError(f"{Path(args.dir) / (item.slug + '.py')} exists already and is never "
                         "overwritten; grade it, "
                         "or start in another --dir") from None
    except OSError as e:
        raise UsageError(f"--dir {args.dir}: {e.strerror or e}") from None
    print(f"wrote {path}: fill in the blanks marked TODO, then run: handgrad dojo grade {path}")
    return 0


def _dojo_names(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        lecture, sep, yours = pair.partition("=")
        if not sep or not lecture.strip().isidentifier() or not yours.strip().isidentifier():
            raise UsageError(f"--name {pair}: write LECTURE=YOURS, e.g. --name dlogprobs=dL_dlogprobs")
        out[lecture.strip()] = yours.strip()
    return out


def _new_output(path: str | None, flag: str, ext: str) -> None:
    """An output the grade writes: named something.EXT, in a folder that exists, never over a file."""
    if path is None or path == "-":
        return
    p = Path(path)
    if not path.endswith(ext):
        raise UsageError(f"{flag} {data.show_path(path)}: name the file something{ext}")
    if not p.resolve().parent.is_dir():
        raise UsageError(f"{flag} {data.show_path(path)}: the folder {data.show_path(p.parent)} does not "
                         "exist")
    if os.path.lexists(p):
        raise UsageError(f"{flag} {data.show_path(path)}: a file of that name exists already and is never "
                         "overwritten; name a new one")


def _write_new(path: str, text: str, flag: str) -> None:
    """Write `text` to the new file `path` atomically, failing (one line) if it appeared meanwhile."""
    p = Path(path)
    tmp = p.parent / f".{p.name}.grade{io.TMP_SUFFIX}"
    try:
        io.atomic_write_bytes(tmp, text.encode())
        try:
            os.link(tmp, p)  # atomic, and fails if the file appeared meanwhile (never overwrites)
        finally:
            tmp.unlink(missing_ok=True)
    except FileExistsError:
        raise UsageError(f"{flag} {data.show_path(path)}: a file of that name appeared meanwhile; it is "
                         "never overwritten") from None
    except OSError as e:
        raise UsageError(f"{flag} {data.show_path(path)}: {e.strerror or e}") from None


def _cmd_dojo_grade(args) -> int:
    import json

    from handgrad import dojo
    from handgrad.dojo import classroom, sandbox

    if not (math.isfinite(args.time_limit) and 0 < args.time_limit <= 3600):
        raise UsageError(f"--time-limit {args.time_limit:g}: give seconds between 0 and 3600 (default 20)")
    try:
        paths = classroom.collect(args.file)
    except classroom.ClassError as e:
        raise UsageError(f"dojo grade {e}") from None
    one = len(args.file) == 1 and len(paths) == 1 and not Path(args.file[0]).is_dir()
    if args.graph and not one:
        raise UsageError("--graph: draws one file's graph; give one file")
    if args.graph and not args.graph.endswith(".svg"):
        raise UsageError(f"--graph {data.show_path(args.graph)}: the picture is SVG; name the file "
                         "something.svg")
    _new_output(args.graph, "--graph", ".svg")
    _new_output(args.csv, "--csv", ".csv")
    _new_output(args.html, "--html", ".html")
    try:
        box = sandbox.choose(args.sandbox)
    except sandbox.SandboxError as e:
        raise UsageError(str(e)) from None
    if box.warning:
        _err(f"warning: {box.warning}")
    names = _dojo_names(args.name)
    if one:
        return _grade_one(args, paths[0], box, names)
    shown = not (args.json or args.csv == "-")

    def each(g) -> None:  # its child is dead: what is printed is the grader's alone
        if shown:
            e = classroom.entry(g)
            print(f"{e.file}: {e.item}: {e.status} {e.score} ({e.seconds:.1f} s)"
                  + (f": {e.first}" if e.first else ""), flush=True)

    grades = dojo.grade_files(paths, args.exercise, strict=args.strict, names=names,
                              time_limit=args.time_limit, sandbox=box, each=each)
    if args.json:
        print(json.dumps(classroom.to_json(grades), indent=1))
    elif args.csv == "-":
        print(classroom.to_csv(grades), end="")
    else:
        print()
        print(classroom.table(grades))
    if args.csv and args.csv != "-":
        _write_new(args.csv, classroom.to_csv(grades), "--csv")
    if args.html:
        _write_new(args.html, classroom.to_html(grades), "--html")
    return classroom.exit_code(grades)


def _grade_one(args, path: Path, box, names: dict[str, str]) -> int:
    import json

    from handgrad import dojo
    from handgrad.dojo import classroom
    from handgrad.dojo.report import safe_text

    g = dojo.grade_file(path, args.exercise, strict=args.strict, names=names, time_limit=args.time_limit,
                        sandbox=box)
    if g.problem:
        _err(f"dojo grade {safe_text(path)}: {safe_text(g.problem)}")
        return 2
    print(json.dumps(g.to_json(), indent=1) if args.json else g.table())
    if args.csv:
        if args.csv == "-":
            print(classroom.to_csv([g]), end="")
        else:
            _write_new(args.csv, classroom.to_csv([g]), "--csv")
    if args.html:
        _write_new(args.html, classroom.to_html([g]), "--html")
    if args.graph and dojo.api.get(g.item).graph is not None:
        tmp = Path(args.graph).with_name(f".{Path(args.graph).name}.draw.svg")
        try:
            dojo.draw(g, tmp)
            _write_new(args.graph, tmp.read_text(encoding="utf-8"), "--graph")
        except OSError as e:
            raise UsageError(f"--graph {data.show_path(args.graph)}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        if not args.json:
            print(f"graph: {args.graph}")
    return g.exit_code


def _cmd_dojo_hint(args) -> int:
    from handgrad import dojo

    try:
        level, what, text = dojo.next_hint(args.file, args.name, args.exercise, args.level)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"dojo hint {args.file}: cannot read it ({type(e).__name__})") from None
    except ValueError as e:
        raise UsageError(f"dojo hint {args.file}: {e}") from None
    print(f"hint {level} of 3 for {args.name}, {what}:\n{text}")
    if level < 3:
        print(f"(ask again for hint {level + 1}: handgrad dojo hint {args.file} {args.name})")
    return 0


def _cmd_dojo_solution(args) -> int:
    from handgrad import dojo

    print(dojo.solution(_dojo_item(args.exercise).key), end="")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("dojo", help="the Backprop Ninja exercises and challenges: start one, fill it in, "
                       "get it graded",
                       description="The lecture's exercises and coding challenges as files you fill in, "
                                   "graded row by "
                       "row with the right upstream gradients fed in, each mistake named.")
    dsub = p.add_subparsers(dest="dojo_command", required=True, metavar="ACTION")
    q = dsub.add_parser("list", help="the exercises, challenges and questions")
    q.add_argument("--dir", default=".", help="where your questions' progress is kept (default: here)")
    q.set_defaults(func=_cmd_dojo_list)
    q = dsub.add_parser("start", help="write an exercise's or challenge's file (never overwrites)")
    q.add_argument("exercise", help="its key, letter or name (see `handgrad dojo list`)")
    q.add_argument("--dir", default=".", help="where to write it (default: here)")
    q.set_defaults(func=_cmd_dojo_start)
    q = dsub.add_parser("grade", help="grade a file, or a class's files: exit 0 all right, 1 something "
                        "wrong, 2 cannot grade",
                        description="Grade one file (its table), or several files and directories of .py "
                        "files at once (a row each, then the gradients the class gets wrong most). Each file "
                        "runs in a sandbox (bubblewrap where it is installed) and one that crashes, loops or "
                        "attacks never stops the others. Exit 0: every file all right; 1: something wrong "
                        "(or, for a class, a file that cannot be graded); 2: bad flags, or one file that "
                        "cannot be graded.")
    q.add_argument("file", nargs="+", metavar="FILE|DIR", help="the exercise or challenge files, or folders")
    q.add_argument("--exercise", help="grade it as this exercise or challenge (default: its content and "
                   "its '# handgrad dojo' line)")
    q.add_argument("--strict", action="store_true",
                   help="shapes exactly: a right value in a shape that broadcasts alike ((64,) for (1, "
                        "64)) is wrong; and a row made by autograd or the dojo's own code is wrong")
    q.add_argument("--name", action="append", metavar="LECTURE=YOURS",
                   help="your name for one of the lecture's (repeatable), e.g. dlogprobs=dL_dlogprobs")
    q.add_argument("--time-limit", type=float, default=20.0,
                   help="seconds for your code (default %(default)s)")
    q.add_argument("--json", action="store_true", help="print JSON instead of the table")
    q.add_argument("--csv", metavar="OUT.csv", help="also write a row per file as CSV (- : print it instead)")
    q.add_argument("--html", metavar="OUT.html", help="also write the grades as an HTML page")
    q.add_argument("--sandbox", choices=("auto", "require", "basic"), default=None,
                   help="auto: bubblewrap where it works, else rlimits with a warning; require: refuse to "
                        "grade without bubblewrap; basic: rlimits only (default: $HANDGRAD_DOJO_SANDBOX, "
                        "else auto)")
    q.add_argument("--graph", metavar="OUT.svg", help="also draw the graph, each tensor coloured by grade")
    q.set_defaults(func=_cmd_dojo_grade)
    q = dsub.add_parser("hint", help="the next of three hints for a row: the rule, the shapes, the form")
    q.add_argument("file", help="your exercise or challenge file (the count of hints is kept beside it)")
    q.add_argument("name", help="the gradient or row, e.g. dprobs")
    q.add_argument("--exercise", help="the exercise or challenge (default: the file's '# handgrad dojo' "
                   "line)")
    q.add_argument("--level", type=int, choices=(1, 2, 3),
                   help="this hint instead of the next (3 gives the answer)")
    q.set_defaults(func=_cmd_dojo_hint)
    q = dsub.add_parser("solution", help="print an exercise's or a challenge's reference file")
    q.add_argument("exercise", help="its key, letter or name (see `handgrad dojo list`)")
    q.set_defaults(func=_cmd_dojo_solution)
    _add_dojo_question_parsers(dsub)


# ---- dojo questions (dojo/quiz.py): ask, answer, quiz, and their lines in `dojo list`
def _dojo_questions_list(args) -> None:
    from handgrad.dojo import quiz
    from handgrad.dojo.progress import ProgressError

    try:
        lines = quiz.list_lines(args.dir)
    except ProgressError as e:  # the list is still worth showing
        print(f"warning: {e}", file=sys.stderr)
        lines = quiz.list_lines(None)
    for line in lines:
        print(line)


def _quiz_call(where: str, fn):
    """Run a quiz call, its bad input (an unknown question, an unreadable progress file) one line."""
    from handgrad.dojo.progress import ProgressError

    try:
        return fn()
    except ProgressError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def _png_path(path: str | None) -> None:
    if path and not path.endswith(".png"):
        raise UsageError(f"--png {path}: the picture is PNG; name the file something.png")
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"--png {path}: the folder {Path(path).parent} does not exist")


def _cmd_dojo_ask(args) -> int:
    from handgrad.dojo import quiz

    _png_path(args.png)
    asked = _quiz_call(f"dojo ask {data.show_path(args.question)}", lambda: quiz.ask(
        args.question, args.dir, experiment=bool(args.png), hint=args.hint, explain=args.explain))
    print(asked.text())
    if args.png:
        try:
            print(f"picture: {asked.experiment.write_png(args.png)}")
        except OSError as e:
            raise UsageError(f"--png {args.png}: {e.strerror or e}") from None
    q = asked.question
    print(f"answer it: handgrad dojo answer {q.number} " + " ".join(p.name.upper() for p in q.parts)
          + ("" if args.png else f"   (see it: handgrad dojo ask {q.number} --png q{q.number}.png)"))
    return 0


def _cmd_dojo_answer(args) -> int:
    import json

    from handgrad.dojo import quiz

    v = _quiz_call(f"dojo answer {data.show_path(args.question)}",
                   lambda: quiz.answer(args.question, "; ".join(args.answer), args.dir))
    if v.problem:
        raise UsageError(f"dojo answer {v.question.number}: {v.problem}")
    print(json.dumps(v.to_json(), indent=1) if args.json else v.text())
    if not v.right and not args.json:
        print(f"(answer again: handgrad dojo answer {v.question.number} ...; the next wrong answer gives the "
              f"next hint; the explanation: handgrad dojo ask {v.question.number} --explain)")
    return v.exit_code


def _cmd_dojo_quiz(args) -> int:
    from handgrad.dojo import answers, quiz

    given = None
    if args.answer:
        given = {}
        for item in args.answer:
            key, eq, text = item.partition("=")
            if not eq:
                raise UsageError(f"--answer {item!r:.60}: write Q=ANSWER, e.g. --answer '1=5; 5; 15; 10'")
            q = _quiz_call(f"--answer {item!r:.60}", lambda key=key: quiz.get(key))
            if q.key in given:
                raise UsageError(f"--answer: question {q.number} is answered twice")
            given[q.key] = text
    if args.png:
        io.prepare_dir(Path(args.png), "--png")

    echo = not sys.stdin.isatty()  # answers piped in are shown beside their prompts, as if typed

    def read(prompt: str) -> str | None:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return None
        if echo:
            print(line)
        return line

    try:
        run = _quiz_call("dojo quiz", lambda: quiz.run_quiz(read, print, args.dir, given, args.png,
                                                            again=args.all))
    except answers.AnswerError as e:
        raise UsageError(f"dojo quiz: {e}") from None
    except KeyboardInterrupt:
        _err("quiz interrupted; every answer graded so far is saved")
        return 130
    return run.exit_code


def _add_dojo_question_parsers(dsub) -> None:
    what = "the question: 1-6, q1-q6 or its name (see `handgrad dojo list`)"
    where = "where your progress is kept (default: here)"
    q = dsub.add_parser("ask", help="show one of the lecture's six questions (and its experiment with --png)")
    q.add_argument("question", help=what)
    q.add_argument("--dir", default=".", help=where)
    q.add_argument("--png", metavar="OUT.png", help="run the question's live experiment and draw it")
    q.add_argument("--hint", action="store_true", help="the next of three hints (counted in your progress)")
    q.add_argument("--explain", action="store_true", help="the explanation")
    q.set_defaults(func=_cmd_dojo_ask)
    q = dsub.add_parser("answer", help="grade an answer to a question: exit 0 right, 1 wrong, 2 cannot grade",
                        description="Grade an answer: the parts separated by ';' (or given as separate "
                        "arguments), or some parts by name (mul.da=15). A wrong part is diagnosed and the "
                        "next of three hints shown.")
    q.add_argument("question", help=what)
    q.add_argument("answer", nargs="+", help="the answer, e.g. 5 5 15 10, or 'dy.expand_as(x); ...' (put -- "
                   "before an answer that starts with '-')")
    q.add_argument("--dir", default=".", help=where)
    q.add_argument("--json", action="store_true", help="print JSON instead of the text")
    q.set_defaults(func=_cmd_dojo_answer)
    q = dsub.add_parser("quiz", help="walk through the six questions (interactive, or --answer for scripts)",
                        description="Ask each question not yet done, part by part ('?' for a hint, "
                        "'explain', 'skip', 'quit'); with --answer, grade the given answers and ask nothing.")
    q.add_argument("--answer", "-a", action="append", metavar="Q=ANSWER", help="an answer to grade "
                   "(repeatable), e.g. -a '1=5; 5; 15; 10' -a '4=a; b; 0.19'")
    q.add_argument("--dir", default=".", help=where)
    q.add_argument("--png", metavar="DIR", help="write each answered question's experiment picture here")
    q.add_argument("--all", action="store_true", help="ask the questions done already too")
    q.set_defaults(func=_cmd_dojo_quiz)
# ---- end dojo questions
