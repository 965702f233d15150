"""`python -m s4nd_vision COMMAND ...`: the `s4nd-vision` command (also `accelerate launch -m s4nd_vision train ...`)."""
from .cli import main

if __name__ == '__main__':
    main()
