"""labpnn: lab daemon and trainer for physical neural networks."""
