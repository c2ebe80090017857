"""``python -m clarify_lit.demo``, the spelling the Makefile, README and results quote: the job is
:mod:`clarify_lit.jobs.demo`."""

from clarify_lit.jobs.demo import main

if __name__ == "__main__":
    main()
