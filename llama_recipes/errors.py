"""The one exception type for problems the user can fix (bad recipe, bad data, bad launch).

The CLI prints a UserError as a short message with no traceback (unless --debug) and exits 2.
Anything else is a bug in llama-recipes or a library, and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input, with what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None, where: str | None = None):
        self.problem, self.fix, self.where = problem, fix, where
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.problem}" if self.where else self.problem
        return f"{head}\n  fix: {self.fix}" if self.fix else head


class RecipeError(UserError):
    """The recipe file is invalid (syntax, unknown key, wrong type, impossible combination)."""


class RunComplete(UserError):
    """Not a failure: the run this command asks for is already done; nothing was changed (exit 0)."""

    exit_code = 0


def read_json(path, fix: str = "restore the file, or train again"):
    """A JSON file the tools wrote (adapter_config.json, head_config.json, metrics.json); damaged: a UserError."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is damaged: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                        fix) from None


class damaged_weights:  # lower case: used as `with damaged_weights(path):`
    """Turn a library's error on reading a damaged artifact (truncated safetensors, missing keys) into a UserError."""

    def __init__(self, path, what: str = "artifact"):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, (UserError, KeyboardInterrupt, SystemExit, MemoryError)):
            return False
        if isinstance(e, (OSError, ValueError, KeyError, RuntimeError)) or type(e).__name__ == "SafetensorError":
            first = str(e).splitlines()[0][:200] if str(e) else ""
            raise UserError(f"cannot load the {self.what} in {self.path}: {type(e).__name__}: {first}",
                            "the directory is damaged or incomplete (a truncated *.safetensors?): point at an intact "
                            "run's output_dir, or train again") from None
        return False
