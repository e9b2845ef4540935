"""``python -m tinyrefine {train,evaluate,predict,demo}``"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())   # a failed command must exit non-zero, so scripts and CI see it
