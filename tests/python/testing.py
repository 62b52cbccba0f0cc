"""The shared bits of the Python tests: PASS/FAIL lines for tests/run.sh and a main() wrapper
that turns an unexpected exception into one FAIL line and the exit status."""
import sys

failures = 0


def report(name, ok, why=""):
    global failures
    print(f"PASS {name}" if ok else f"FAIL {name}: {why}", flush=True)
    failures += 0 if ok else 1


def run_main(main, name):
    global failures
    try:
        main()
    except Exception as exc:  # a crash of the test itself is a failure with its message
        failures += 1
        print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    sys.exit(1 if failures else 0)
