"""`python -m s4nd_vision COMMAND ...`: the `s4nd-vision` command.

Also the way to launch training on many processes from an installed wheel:
`accelerate launch --multi_gpu -m s4nd_vision train --config ...`.
"""
from .cli import main

if __name__ == '__main__':
    main()
