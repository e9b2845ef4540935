"""``python -m tinyrefine {train,evaluate,predict,demo}``"""
from .cli import main

if __name__ == "__main__":
    main()
