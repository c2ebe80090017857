"""``python -m clarify_lit.iterate``: the same as ``clarify iterate``; the job is :mod:`clarify_lit.jobs.iterate`."""

from clarify_lit.jobs.iterate import main

if __name__ == "__main__":
    main()
