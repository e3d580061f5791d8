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
