from qscore.cli import app

app(prog_name="qscore")
