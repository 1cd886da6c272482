from qscore.cli import app

if __name__ == "__main__":  # not in spawned workers, which import this module too
    app(prog_name="qscore")
