"""Wrap a user's command so that its outcome on a MeshCentral device is exact.

MeshCentral's ``runcommands`` gives back one string, stdout and stderr merged, and
nothing else: no exit status, no timeout on the agent, and a command that reads stdin
eats the rest of the script (and can wedge the agent's single command slot).  This
module turns a command into a script that reports its own outcome in-band, and parses
that report back out of the reply.  It is pure: no I/O, no network, no ``meshctrl``.

Protocol
========

Every wrapped run gets a per-run random *marker* (``secrets.token_hex(16)``; it is not
derived from the command).  The script prints, in this order::

    <newline>GR_BEGIN_<marker><newline>
    ... the command's own output (stdout and stderr, byte for byte) ...
    <newline>GR_END_<marker> rc=<integer> timeout=<0|1>[ cut=<bytes>]<newline>

``<newline>`` is ``\\n`` for ``sh`` and ``\\r\\n`` for ``cmd``/``powershell``.  The
newline *before* ``GR_END`` is always printed by the wrapper, so the END line starts
a line even when the command's output does not end with a newline, and
:func:`parse_result` removes exactly that one newline again: the output is returned
byte-exact, *including a missing trailing newline*.  (``parse_result`` learns which
newline the transport used from the BEGIN line, so a pty that turns ``\\n`` into
``\\r\\n`` does not break parsing.)

Only lines with the exact marker, at the start of a line, in the exact format are
trusted: ``GR_BEGIN_<marker>`` alone on its line; ``GR_END_<marker> rc=<-?digits>
timeout=<0|1>`` alone on its line.  The first valid BEGIN line starts the output and
the *last* valid END line ends it (the wrapper prints its END line after the command
has finished, so the last one is the wrapper's).  Text before BEGIN (shell noise, an
echo of the script, a prompt) and after END (a prompt, the agent's ``exit``) is
dropped; everything in between is returned untouched.  The marker is never passed to
the command (not in argv, not in the environment, not in a file), and the wrapper
source never contains ``GR_BEGIN_<marker>`` or ``GR_END_<marker>`` as one piece (the
two halves are joined at run time), so an echo of the script, a forged
``GR_END_...`` line, or a copy of an earlier run's output (another marker) cannot
change the result.

The journal (``sh``): every dispatch of one attempt carries the attempt's *key*
(``once``; GhostRunner derives it from the task, the device and the attempt number).
In the journal directory (``$GHOSTRUNNER_JOURNAL``, else ``/var/lib/ghostrunner`` when
``/var/lib`` is writable, else ``$HOME/.ghostrunner``; made with ``mkdir -m 700``, never
``-p``, and used only if it is a real directory, not a link, owned by the agent's user)
the wrapper creates the record ``<key>`` with ``O_EXCL`` (``set -C``) before BEGIN:
``s <pid>``; when the command is over it appends ``e <status> <timed out> <bytes
cut>``; the output is ``<key>.o``.  A dispatch whose key already has a record runs
nothing and reports instead: ``GR_RECORD_<marker>`` and the recorded BEGIN / output /
END (:class:`ParsedResult` ``journal="record"``), ``GR_RUNNING_<marker>`` (the first
copy's shell is alive), or ``GR_UNKNOWN_<marker>`` (it started, and its shell died
without recording an end).  With ``recover`` (GhostRunner lost the reply and asks), a
missing journal, or one without its ``id`` file, is ``GR_GONE_<marker>``: it was wiped,
and nothing proves the attempt never started; a recovery request never creates one.
No usable journal at all: ``GR_NOJOURNAL_<marker> <why>``, and nothing runs.
``collect`` keys are removed (with every record older than two days) by one ``find``
before the command.  So a resend of an attempt can never run the command a second time
on a device, and its outcome survives GhostRunner, MeshCentral and agent restarts.

``rc`` is the command's own exit status.  ``timeout=1`` means the device-side timeout
fired and the command was killed; :class:`ParsedResult` then reports ``timed_out=True``
and ``exit_code=None`` (the number the wrapper saw is only the killer's status).

sh (Linux, macOS, FreeBSD agents; ``mesh_type`` 0)
-------------------------------------------------

The agent writes the script to the stdin of ``/bin/sh`` (dash, bash, BSD sh, busybox
ash) after removing every ``\\r`` from it.  The script:

* embeds the command as one single-quoted shell word (``'`` becomes ``'\\''``; a
  carriage return becomes ``'"$gr_cr"'``, a variable holding ``\\r``, so the agent's
  ``\\r`` stripping cannot alter it).  Quotes, newlines, ``$``, ``%``, backticks,
  backslashes, non-ASCII text and very long commands pass through unchanged.  NUL
  characters cannot be passed to a shell and are rejected.
* runs it as ``sh -c COMMAND sh </dev/null``, evaluated at the top level of a fresh
  ``/bin/sh`` (the text comes in the environment variable ``GR_C``, unset before the
  command runs; a command over 100 KB, more than Linux allows in one argument, is
  written to ``<key>.c`` and read from there).  So ``$$`` is its own shell, ``exit``
  and ``trap ... EXIT`` work as usual, ``$0`` is ``sh``, there are no positional
  parameters, and ``read x`` or ``cat`` sees EOF at once instead of eating the script
  or hanging the agent.  Its stdout and stderr go to ``<key>.o`` (one open file
  description); the wrapper caps that file on the device (head and tail kept) and
  prints it between BEGIN and END when the command is over.  The exit status is the
  one ``wait`` gave the wrapper: no descriptor the command or its parent holds carries
  it.  The wrapper's own stderr is ``/dev/null``, so job reports ("Killed") never
  reach the output.
* enforces the timeout on the device, rounded up to whole seconds:

  - with ``timeout`` when ``command -v timeout`` finds one that accepts ``--verbose``
    and ``--kill-after`` (GNU coreutils 8.24 and later; a FreeBSD one that has
    ``--verbose``): ``timeout --verbose --kill-after=K T``.  It signals every process
    of the command (GNU: its process group; FreeBSD: all descendants), so
    grandchildren such as ``sh -c 'sleep 100'`` die too: SIGTERM first, SIGKILL
    ``kill_after`` seconds later.  Its own stderr (not the command's) goes to
    ``<key>.t``, where ``--verbose`` says ``timeout: sending signal ...`` exactly when
    it fires.  Whether it works is probed once per journal (``timeout.ok`` /
    ``timeout.no``).  On Linux, a timeout also kills every process whose environment
    carries the run's random ``GHOSTRUNNER_RUN`` tag: a child that called ``setsid``
    left the process group but not that.
  - otherwise (macOS, busybox, an older ``timeout``) a watchdog: the command runs as
    a background job in its own process group (``setsid`` if it exists, else ``set
    -m`` job control), and a background ``sleep T`` fires SIGTERM, then
    ``kill_after`` seconds later SIGKILL, at that process group and at every
    descendant (found with ``ps``) outside it; where neither ``setsid`` nor job
    control works (dash without a tty and without ``setsid``) at every descendant.
    Each process gets each signal once.  The watchdog and its ``sleep`` are killed as
    soon as the command finishes.

  ``timed_out`` does not rely on exit status 124 alone: the run timed out if and only
  if the watchdog fired, or ``timeout`` said it sent a signal and exited 124 or 137 (a
  command that itself exits 124 is exit 124).  A command that writes a
  ``timeout: ...`` line to its parent's stderr and exits 124 can make itself read as
  timed out; never as succeeded.

Processes that the command leaves running in the background (``nohup x &``) are not
killed when the command finishes (their output goes on into ``<key>.o``, which no one
reads any more; the agent does not wait for them).  SIGPIPE or other signals the
agent ignores stay ignored for the command (a shell cannot undo that).  Commands run
with ``runAsUser`` (a pty) are not supported: the pty echoes the script and mangles
line endings and long lines.

cmd and powershell (Windows agents; ``mesh_type`` 2)
----------------------------------------------------

Both are sent to Windows PowerShell (type 2, which the agent runs as
``powershell -noprofile -nologo -command -``) as **one line** of ASCII text, so an
echo of the script or a prompt can only appear before BEGIN, and the command is
base64-encoded, so it needs no quoting at all:

* ``powershell``: a child ``powershell.exe -NoProfile -NonInteractive -ExecutionPolicy
  Bypass -EncodedCommand <UTF-16LE base64 of the command>``, so the command runs with
  ``powershell -Command`` semantics (exit status: ``exit N``, else 0 or 1 from ``$?``).
  A Windows command line stops at 32767 characters, so a command longer than 12000
  characters (or an empty one) is written (UTF-8) to a temporary ``.ps1`` file instead,
  and the encoded command is a bootstrap that dot-sources its text as a script block
  (``. ([ScriptBlock]::Create(...))``; not subject to the execution policy, unlike
  ``-File``); the file is deleted afterwards.
* ``cmd``: the command is written (UTF-8, no BOM, ``\\n`` turned into ``\\r\\n``) into
  a temporary ``.cmd`` file between ``@echo off`` / ``chcp 65001 >nul`` and a final
  ``@exit /b %errorlevel%``, run with ``cmd.exe /d /s /c "<file>"`` and deleted
  afterwards.  Batch-file rules apply: ``%%i`` in ``for`` loops, ``%%`` for a literal
  ``%``, ``%~dp0`` is the temp directory.

The child is started with ``System.Diagnostics.Process`` with its stdin redirected to
a pipe that is closed at once (EOF, like ``NUL``) and its stdout/stderr inherited, so
its output goes straight into the agent's pipe between BEGIN and END.  The console
output code page is set to UTF-8 first.  On timeout the wrapper runs ``taskkill /T /F``
on the child's process tree (no graceful stage on Windows).  The END line is built
from ``$p.ExitCode`` at run time; the script text contains only the variable, never a
literal status, so it can never be read as an END line.  Untested on real Windows.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
from typing import Final, Literal

import attrs

__all__ = [
    "Journal",
    "ParsedResult",
    "ShellName",
    "WrappedCommand",
    "has_started",
    "parse_result",
    "wrap_command",
]

ShellName = Literal["sh", "cmd", "powershell"]
"""The shells :func:`wrap_command` understands (a str Enum with these values works too)."""

_SHELLS: Final = frozenset({"sh", "cmd", "powershell"})
_MESH_TYPE: Final = {"sh": 0, "cmd": 2, "powershell": 2}
_MARKER_RE: Final = re.compile(r"[0-9A-Za-z]{16,128}")
_BEGIN: Final = "GR_BEGIN_"
_END: Final = "GR_END_"

_PS_DIRECT_MAX_BASE64: Final = 32_000
"""Longest base64 text passed as ``-EncodedCommand`` (Windows command lines stop at 32767)."""

_MAX_WAIT_MS: Final = 2**31 - 1


@attrs.frozen(kw_only=True)
class WrappedCommand:
    """A command wrapped for one run.

    ``script`` is the text to send as MeshCentral ``runcommands`` ``cmds`` with
    ``"type": mesh_type``.  ``marker`` is the per-run secret that makes the report
    lines unforgeable; keep it with the run and pass this object to
    :func:`has_started` / :func:`parse_result`.
    """

    script: str = attrs.field(repr=lambda s: f"<{len(s)} chars>")
    mesh_type: int
    marker: str = attrs.field(repr=False)
    shell: str
    journal: bool = False
    """The script keeps a record of the attempt on the device (``sh``)."""
    key: str | None = None
    """The attempt's key in the device's journal (``sh``)."""


Journal = Literal["", "record", "running", "unknown", "gone", "unusable"]
"""What the device's journal said instead of (or before) running the command.

* ``""``: nothing special: the command ran now (or, for Windows, no journal).
* ``"record"``: the attempt had already run; the outcome comes from its record, and
  the command was not run again.
* ``"running"``: the attempt is still running on the device (started by an earlier
  copy of this dispatch); ask again later.
* ``"unknown"``: the attempt started but its wrapper died before recording an outcome
  (the device restarted mid-run): it may or may not have finished.
* ``"gone"``: a recovery request found no journal (or one without its ``id``): it was
  wiped, so nothing proves the attempt never started; not run.
* ``"unusable"``: the device has no usable journal directory (``detail`` says why);
  nothing ran.
"""


@attrs.frozen(kw_only=True)
class ParsedResult:
    """What :func:`parse_result` found in a reply.

    ``started``: the BEGIN line was seen (the command was launched, or its record is
    reported).  ``completed``: the wrapper's END line was seen (the run is over:
    finished or killed).  ``exit_code``: the command's own exit status; ``None``
    unless completed and not timed out.  ``timed_out``: the device-side timeout fired
    and killed the command.  ``output``: the command's own output, wrapper lines
    removed, otherwise untouched.  ``truncated``: the device kept only the head and
    tail of a longer output (``sh``).  ``journal``: see :data:`Journal`; ``detail``:
    the reason given with ``"unusable"``.
    Not started: the whole raw text (for diagnostics).  Started but not completed:
    everything after the BEGIN line.
    """

    started: bool
    completed: bool
    exit_code: int | None
    timed_out: bool
    output: str
    truncated: bool = False
    journal: Journal = ""
    detail: str = ""


def _shell_name(shell: object) -> str:
    value = getattr(shell, "value", shell)
    if not isinstance(value, str) or value not in _SHELLS:
        raise ValueError(f"unknown shell {shell!r}; expected one of {sorted(_SHELLS)}")
    return value


def _whole_seconds(value: float, what: str, *, minimum: int) -> int:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number of seconds, got {value!r}")
    return max(minimum, math.ceil(value))


def _sh_word(text: str) -> str:
    """Quote ``text`` as one sh word that survives the agent's removal of ``\\r``."""
    return "'" + text.replace("'", "'\\''").replace("\r", "'\"$gr_cr\"'") + "'"


# The sh wrapper.  @NAME@ placeholders are filled in by _wrap_sh.  The whole script is
# one { ... } group, so the shell reads all of it before running any of it: nothing of
# it is left in the agent's pipe for the command to read.  Its own stderr goes to
# /dev/null (job reports such as "Killed" never reach the output).
#
# The journal (see the module docstring, "The journal"): $gr_d, the record of this
# attempt $gr_r ("s <pid>" when it starts, "e <status> <timed out> <bytes cut>" when
# it is over), its output $gr_r.o, and $gr_r.t, where timeout(1) --verbose or the
# watchdog says that they fired.  No process of the command holds a descriptor of the
# record, and the status in it is the one `wait` gave the wrapper: nothing the command
# writes can change it.
_SH_TEMPLATE: Final = """{
exec 2>/dev/null
@CR@gr_m=@MARKER@
gr_k=@KEY@
gr_c=@COMMAND@
gr_sh=@SH@
gr_d=${GHOSTRUNNER_JOURNAL:-}
if [ -z "$gr_d" ]; then
  if [ -w /var/lib ]; then
    gr_d=/var/lib/ghostrunner
  elif [ -n "${HOME:-}" ] && [ -d "$HOME" ] && [ -O "$HOME" ]; then
    gr_d=$HOME/.ghostrunner
  fi
fi
gr_why=
if [ -z "$gr_d" ]; then
  gr_why="no journal directory: set GHOSTRUNNER_JOURNAL in the agent's environment"
else
  if [ ! -e "$gr_d" ] && [ ! -h "$gr_d" ]; then
    if [ @RECOVER@ = 1 ]; then printf '\\nGR_%s_%s\\n' GONE "$gr_m"; exit 0; fi
    mkdir -m 700 "$gr_d"
  fi
  if [ -h "$gr_d" ] || [ ! -d "$gr_d" ] || [ ! -O "$gr_d" ]; then
    gr_why="$gr_d is not a directory of the agent's user (a symbolic link is refused)"
  elif [ ! -f "$gr_d/id" ]; then
    if [ @RECOVER@ = 1 ]; then printf '\\nGR_%s_%s\\n' GONE "$gr_m"; exit 0; fi
    printf '%s\\n' "$gr_m" >"$gr_d/id" || gr_why="cannot write to $gr_d"
  fi
fi
if [ -n "$gr_why" ]; then printf '\\nGR_%s_%s %s\\n' NOJOURNAL "$gr_m" "$gr_why"; exit 0; fi
@COLLECT@gr_r=$gr_d/$gr_k
gr_o=$gr_r.o
set -C
if printf 's %s\\n' "$$" >"$gr_r"; then
set +C
printf '\\nGR_BEGIN_%s\\n' "$gr_m"
@BIG@if [ -f "$gr_d/timeout.ok" ]; then
  gr_g=1
elif [ -f "$gr_d/timeout.no" ]; then
  gr_g=
elif command -v timeout >/dev/null \\
  && timeout --verbose --kill-after=1 5 true </dev/null >/dev/null; then
  gr_g=1
  printf '' >"$gr_d/timeout.ok"
else
  gr_g=
  printf '' >"$gr_d/timeout.no"
fi
if [ -n "$gr_g" ]; then
  GR_C=$gr_c GHOSTRUNNER_RUN=@TAG@ timeout --verbose --kill-after=@KILL_AFTER@ @TIMEOUT@ \\
    "$gr_sh" -c "$gr_x" sh </dev/null >"$gr_o" 3>&1 2>"$gr_r.t"
  gr_e=$?
else
  gr_tree() {
    { ps -A -o pid= -o ppid= -o pgid= || ps -o pid= -o ppid= -o pgid=; } |
      awk -v r="$1" -v g="$2" '
      { k[NR] = $1; p[NR] = $2; q[NR] = $3 }
      END { s[r] = 1
        do { n = 0
          for (i = 1; i <= NR; i++)
            if ((p[i] in s) && !(k[i] in s)) { s[k[i]] = 1; n = 1; if (q[i] != g) print k[i] }
        } while (n) }'
  }
  gr_kill() {
    if kill -0 -"$2"; then
      gr_l=$(gr_tree "$2" "$2")
      kill -"$1" -"$2"
    else
      gr_l=$(gr_tree "$2" "")
      kill -"$1" "$2"
    fi
    for gr_q in $gr_l; do kill -"$1" "$gr_q"; done
    if [ "$1" != KILL ]; then
      kill -CONT -"$2"
      for gr_q in "$2" $gr_l; do kill -CONT "$gr_q"; done
    fi
  }
  printf '' >"$gr_r.t"
  if command -v setsid >/dev/null; then
    GR_C=$gr_c GHOSTRUNNER_RUN=@TAG@ setsid \\
      "$gr_sh" -c "$gr_x" sh </dev/null >"$gr_o" 3>&1 &
  else
    set -m
    GR_C=$gr_c GHOSTRUNNER_RUN=@TAG@ "$gr_sh" -c "$gr_x" sh </dev/null >"$gr_o" 3>&1 &
  fi
  gr_p=$!
  ( gr_z=
    gr_h=
    trap 'gr_h=1; kill -KILL $gr_z' TERM
    sleep @TIMEOUT@ & gr_z=$!
    [ -z "$gr_h" ] || kill -KILL "$gr_z"
    wait "$gr_z"
    [ -z "$gr_h" ] || exit 0
    echo "timeout: watchdog fired" >"$gr_r.t"
    gr_kill TERM "$gr_p"
    [ -z "$gr_h" ] || exit 0
    sleep @KILL_AFTER@ & gr_z=$!
    [ -z "$gr_h" ] || kill -KILL "$gr_z"
    wait "$gr_z"
    [ -z "$gr_h" ] || exit 0
    gr_kill KILL "$gr_p"
  ) </dev/null >/dev/null &
  gr_w=$!
  wait "$gr_p"
  gr_e=$?
  kill "$gr_w"
  wait "$gr_w"
  set +m
fi
gr_to=0
gr_l=
[ ! -s "$gr_r.t" ] || read -r gr_l <"$gr_r.t"
case $gr_l in
  timeout:*)
    if [ -z "$gr_g" ]; then
      gr_to=1
    else
      case $gr_e in 124|137) gr_to=1 ;; esac
    fi ;;
esac
if [ $gr_to = 1 ] && [ -r /proc/self/environ ]; then
  for gr_q in $(grep -l -a -F GHOSTRUNNER_RUN=@TAG@ /proc/[0-9]*/environ); do
    gr_q=${gr_q#/proc/}
    kill -KILL "${gr_q%/environ}"
  done
fi
gr_cut=0
if [ -s "$gr_o" ]; then
  gr_n=$(wc -c <"$gr_o")
  case $gr_n in *[0-9]*) ;; *) gr_n=0 ;; esac
  if [ $((gr_n)) -gt @LIMIT@ ]; then
    gr_cut=$((gr_n - @HALF@ - @HALF@))
    { head -c @HALF@ "$gr_o"
      printf '\\n[... %s bytes cut on the device by GhostRunner ...]\\n' "$gr_cut"
      tail -c @HALF@ "$gr_o"; } >"$gr_o.c" && mv -f "$gr_o.c" "$gr_o"
  fi
fi
printf 'e %s %s %s\\n' "$gr_e" "$gr_to" "$gr_cut" >>"$gr_r"
[ -s "$gr_o" ] && cat "$gr_o"
printf '\\nGR_END_%s rc=%s timeout=%s cut=%s\\n' "$gr_m" "$gr_e" "$gr_to" "$gr_cut"
@CLEANUP@else
set +C
gr_s=
gr_e=
if [ -f "$gr_r" ]; then
  while read -r gr_a gr_b gr_y gr_z; do
    case $gr_a in s) gr_s=$gr_b ;; e) gr_e=$gr_b; gr_to=$gr_y; gr_cut=$gr_z ;; esac
  done <"$gr_r"
else
  printf '\\nGR_%s_%s cannot write to %s\\n' NOJOURNAL "$gr_m" "$gr_d"
  exit 0
fi
if [ -n "$gr_e" ]; then
  printf '\\nGR_%s_%s\\n' RECORD "$gr_m"
  printf '\\nGR_BEGIN_%s\\n' "$gr_m"
  [ -s "$gr_o" ] && cat "$gr_o"
  printf '\\nGR_END_%s rc=%s timeout=%s cut=%s\\n' "$gr_m" "$gr_e" "$gr_to" "$gr_cut"
elif [ -n "$gr_s" ] && kill -0 "$gr_s"; then
  printf '\\nGR_%s_%s\\n' RUNNING "$gr_m"
else
  printf '\\nGR_%s_%s\\n' UNKNOWN "$gr_m"
fi
fi
}
"""

# The command runs as `sh -c COMMAND sh </dev/null`, evaluated at the top level of that
# shell; its text comes in the environment variable GR_C, which it unsets first.  Its
# stderr is fd 3 (the output file: one open file description with stdout) until it
# moves it to fd 2 itself, so that timeout(1) alone writes to the .t file.
_SH_SMALL: Final = """gr_x='exec 2>&3 3>&-; eval "unset GR_C; $GR_C"'\n"""
# A command too long for one argument (Linux: 128 KiB) is read from a file first.
_SH_BIG: Final = (
    """printf '%s' "$gr_c" >"$gr_r.c"\n"""
    """gr_c=$gr_r.c\n"""
    """gr_x='exec 2>&3 3>&-; eval "unset GR_C; $(cat "$GR_C")"'\n"""
)
_ARG_BYTES_MAX: Final = 100_000

# Removes the records GhostRunner has collected, and any older than two days: a record
# is needed only until GhostRunner has its outcome, and it asks a device for a lost one
# before it sends that device anything else, so a record left this long was never
# going to be collected (its key was forgotten in a restart).
_SH_COLLECT: Final = """find "$gr_d" -type f ! -name id ! -name "$gr_k*" \\
  \\( @NAMES@ -mtime +1 \\) -exec rm -f {} + </dev/null >/dev/null
"""


def _wrap_sh(
    command: str, marker: str, timeout: float, kill_after: float, sh_path: str,
    output_limit: int, key: str, *, recover: bool, collect: tuple[str, ...], keep: bool,
    tag: str,
) -> str:
    names = "".join(f"-name {k}'*' -o " for k in collect)
    big = len(command.encode("utf-8", "surrogatepass")) > _ARG_BYTES_MAX
    fields = {
        "@COLLECT@": _SH_COLLECT.replace("@NAMES@", names) if collect else "",
        "@BIG@": _SH_BIG if big else _SH_SMALL,
        "@CLEANUP@": "" if keep else 'rm -f "$gr_r" "$gr_o" "$gr_r.t" "$gr_r.c"\n',
        "@RECOVER@": "1" if recover else "0",
        "@KEY@": key,
        "@TAG@": tag,
        "@LIMIT@": str(output_limit),
        "@HALF@": str(output_limit // 2),
        # only when needed: it costs a fork
        "@CR@": "gr_cr=$(printf '\\015')\n" if "\r" in command else "",
        "@MARKER@": _sh_word(marker),
        "@SH@": _sh_word(sh_path),
        "@TIMEOUT@": str(_whole_seconds(timeout, "timeout", minimum=1)),
        "@KILL_AFTER@": str(_whole_seconds(kill_after, "kill_after", minimum=1)),
    }
    script = _SH_TEMPLATE
    for name, value in fields.items():
        script = script.replace(name, value)
    # The command last, so that placeholder-like text inside it is never replaced.
    return script.replace("@COMMAND@", _sh_word(command))


_CMD_PROLOGUE: Final = "@echo off\r\nchcp 65001 >nul 2>nul\r\n"
_CMD_EPILOGUE: Final = "\r\n@exit /b %errorlevel%\r\n"


def _cmd_file_text(command: str) -> str:
    """The temporary batch file: ``\\n`` line ends become ``\\r\\n`` (cmd needs them)."""
    body = re.sub(r"(?<!\r)\n", "\r\n", command)
    return _CMD_PROLOGUE + body + _CMD_EPILOGUE


def _wrap_windows(command: str, shell: str, marker: str, timeout: float) -> str:
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    wait_ms = min(_MAX_WAIT_MS, math.ceil(timeout * 1000))
    system = "[System.Environment]::SystemDirectory"
    temp_file = (
        "$f = [System.IO.Path]::Combine([System.IO.Path]::GetTempPath(), "
        "'gr_' + [System.Guid]::NewGuid().ToString('N') + '{ext}')"
    )
    write_file = "[System.IO.File]::WriteAllBytes($f, [System.Convert]::FromBase64String('{}'))"
    powershell_exe = (
        f"$i.FileName = [System.IO.Path]::Combine({system}, "
        "'WindowsPowerShell\\v1.0\\powershell.exe')"
    )
    child_options = "-NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand "
    if shell == "powershell":
        encoded = base64.b64encode(command.encode("utf-16-le")).decode("ascii")
        if command and len(encoded) <= _PS_DIRECT_MAX_BASE64:
            launch = [powershell_exe, f"$i.Arguments = '{child_options}{encoded}'"]
        else:
            # Too long for a command line (or empty, which -EncodedCommand refuses):
            # the text goes to a temp file, and a small encoded bootstrap dot-sources it.
            payload = base64.b64encode(command.encode("utf-8")).decode("ascii")
            launch = [
                temp_file.format(ext=".ps1"),
                write_file.format(payload),
                '$b = ". ([ScriptBlock]::Create([System.IO.File]::ReadAllText(\'" + '
                '$f.Replace("\'", "\'\'") + "\', [System.Text.Encoding]::UTF8)))"',
                powershell_exe,
                f"$i.Arguments = '{child_options}' + "
                "[System.Convert]::ToBase64String([System.Text.Encoding]::Unicode.GetBytes($b))",
            ]
    else:
        payload = base64.b64encode(_cmd_file_text(command).encode("utf-8")).decode("ascii")
        launch = [
            temp_file.format(ext=".cmd"),
            write_file.format(payload),
            f"$i.FileName = [System.IO.Path]::Combine({system}, 'cmd.exe')",
            "$i.Arguments = '/d /s /c \"\"' + $f + '\"\"'",
        ]
    body = [
        "$i = New-Object System.Diagnostics.ProcessStartInfo",
        *launch,
        "$i.UseShellExecute = $false",
        "$i.RedirectStandardInput = $true",
        '$o.Write("`r`n' + _BEGIN + '" + $m + "`r`n")',
        "$o.Flush()",
        "$p = [System.Diagnostics.Process]::Start($i)",
        "$p.StandardInput.Close()",
        "$t = 0",
        f"if (-not $p.WaitForExit({wait_ms})) {{ $t = 1; "
        f"& ([System.IO.Path]::Combine({system}, 'taskkill.exe')) /T /F /PID $p.Id 2>&1 "
        "| Out-Null; "
        "$p.WaitForExit() }",
        "$p.WaitForExit()",
        "$rc = $p.ExitCode",
        '$o.Write("`r`n' + _END + '" + $m + " rc=" + $rc + " timeout=" + $t + "`r`n")',
        "$o.Flush()",
    ]
    statements = [
        f"$m = '{marker}'",
        "$f = $null",
        "try { [System.Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false } "
        "catch { }",
        "$o = [System.Console]::Out",
        "try { "
        + "; ".join(body)
        + ' } catch { $o.Write("`r`nghostrunner: wrapper error: " + $_ + "`r`n"); $o.Flush() }'
        " finally { if ($f) { try { [System.IO.File]::Delete($f) } catch { } } }",
    ]
    return "& { " + "; ".join(statements) + " }"


def wrap_command(
    command: str,
    shell: str,
    *,
    timeout: float,
    marker: str | None = None,
    once: str | None = None,
    recover: bool = False,
    collect: tuple[str, ...] = (),
    kill_after: float = 5.0,
    output_limit: int = 64 * 1024,
    _sh_path: str = "/bin/sh",
) -> WrappedCommand:
    """Wrap ``command`` for ``shell`` (``"sh"``, ``"cmd"`` or ``"powershell"``).

    ``timeout`` (seconds, > 0) is enforced on the device; ``sh`` rounds it up to whole
    seconds.  ``kill_after`` (``sh`` only, rounded up, at least 1) is the grace between
    SIGTERM and SIGKILL.  ``marker`` defaults to ``secrets.token_hex(16)``; pass one
    only in tests (16-128 ASCII letters and digits).

    ``sh`` only (see "The journal" in the module docstring): ``once`` (16-128 ASCII
    letters and digits) is the attempt's key in the device's journal: the same key
    never runs the command twice on one device, and its record stays until collected.
    Without one, a random key is used and the record removed at the end.  ``recover``:
    this attempt may have reached the device before: report its record, run it only
    if the journal proves it never started, and never create a journal.  ``collect``:
    keys whose records GhostRunner has stored, to remove (with any record older than
    two days).  ``_sh_path`` (tests only) is the shell that runs the command; the agent
    uses ``/bin/sh``.

    Raises ``ValueError`` for an unknown shell (``"auto"`` must be resolved first), a
    bad timeout, kill_after, marker or key, or a command containing NUL (which no shell
    can receive); ``TypeError`` if ``command`` is not a ``str``.
    """
    name = _shell_name(shell)
    if not isinstance(command, str):
        raise TypeError(f"command must be str, got {type(command).__name__}")
    if "\x00" in command:
        raise ValueError("command contains a NUL character, which no shell can receive")
    if marker is None:
        marker = secrets.token_hex(16)
    elif not _MARKER_RE.fullmatch(marker):
        raise ValueError("marker must be 16-128 ASCII letters and digits")
    for key in (once, *collect):
        if key is not None and not _MARKER_RE.fullmatch(key):
            raise ValueError("once and collect keys must be 16-128 ASCII letters and digits")
    if name != "sh":
        script = _wrap_windows(command, name, marker, timeout)
        return WrappedCommand(script=script, mesh_type=_MESH_TYPE[name], marker=marker,
                              shell=name)
    if isinstance(output_limit, bool) or not isinstance(output_limit, int) or (
        output_limit < 2
    ):
        raise ValueError("output_limit must be an integer of at least 2 bytes")
    key = once if once is not None else secrets.token_hex(16)
    script = _wrap_sh(
        command, marker, timeout, kill_after, _sh_path, output_limit, key,
        recover=recover, collect=collect, keep=once is not None, tag=secrets.token_hex(12),
    )
    return WrappedCommand(script=script, mesh_type=_MESH_TYPE[name], marker=marker,
                          shell=name, journal=True, key=key)


# The report lines, for any marker (compiled once: a pattern per run's marker would be
# compiled anew for every run); callers keep the matches that carry theirs.  The line
# ends are looked at, not consumed, so that a line right after another still starts
# after a newline.
_BEGIN_RE: Final = re.compile(r"(?:\A|\n)GR_BEGIN_([0-9A-Za-z]{16,128})(?=(\r?\n))")
_END_RE: Final = re.compile(
    r"\nGR_END_([0-9A-Za-z]{16,128}) rc=(-?[0-9]{1,10}) timeout=([01])"
    r"(?: cut=([0-9]{1,20}))?(?=\r?\n|\Z)"
)
_JOURNAL_RE: Final = re.compile(
    r"(?:\A|\n)GR_(RECORD|RUNNING|UNKNOWN|GONE|NOJOURNAL)_([0-9A-Za-z]{16,128})"
    r"(?: ([^\r\n]*))?(?=\r?\n|\Z)"
)


def _begin(marker: str, text: str) -> re.Match[str] | None:
    """The first BEGIN line with ``marker``, complete with its line end."""
    return next((m for m in _BEGIN_RE.finditer(text) if m.group(1) == marker), None)


def has_started(wrapped: WrappedCommand, text: str) -> bool:
    """True once ``text`` (the reply, or console chunks accumulated so far) holds the
    wrapper's BEGIN line, complete with its line end: the command has been launched."""
    return wrapped.marker in text and _begin(wrapped.marker, text) is not None


def parse_result(wrapped: WrappedCommand, raw: str) -> ParsedResult:
    """Parse the text MeshCentral returned for ``wrapped`` (stdout+stderr merged).

    Output is the text between the first valid BEGIN line and the newline the wrapper
    printed before the last valid END line, byte-exact.  See the module docstring.
    """
    marker = wrapped.marker
    begin = _begin(marker, raw)
    journal, detail = _journal_line(marker, raw, begin.start() if begin else len(raw))
    if begin is None:
        return ParsedResult(
            started=False, completed=False, exit_code=None, timed_out=False, output=raw,
            journal=journal, detail=detail,
        )
    newline = begin.group(2)  # the transport's line end, as the BEGIN line has it
    body = raw[begin.end() + len(newline) :]
    last = None
    for m in _END_RE.finditer(body):
        if m.group(1) == marker and (newline == "\n" or body[m.start() - 1 : m.start()] == "\r"):
            last = m
    if last is None:
        return ParsedResult(
            started=True, completed=False, exit_code=None, timed_out=False, output=body,
            journal=journal,
        )
    timed_out = last.group(3) == "1"
    return ParsedResult(
        started=True,
        completed=True,
        exit_code=None if timed_out else int(last.group(2)),
        timed_out=timed_out,
        output=body[: last.start() - (len(newline) - 1)],
        truncated=int(last.group(4) or 0) > 0,
        journal=journal,
    )


_JOURNAL_WORDS: Final[dict[str, Journal]] = {
    "RECORD": "record", "RUNNING": "running", "UNKNOWN": "unknown", "GONE": "gone",
    "NOJOURNAL": "unusable",
}


def _journal_line(marker: str, raw: str, before: int) -> tuple[Journal, str]:
    """The journal's report line (with this run's marker, on a line of its own, before
    the BEGIN line), if any, and the text that follows it on that line."""
    for found in _JOURNAL_RE.finditer(raw, 0, before):
        if found.group(2) == marker:
            return _JOURNAL_WORDS[found.group(1)], found.group(3) or ""
    return "", ""
