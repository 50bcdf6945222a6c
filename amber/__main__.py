from amber.cli import app

app(prog_name="amber")
