from bincount.cli import app

app(prog_name="bincount")
