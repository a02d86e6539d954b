"""``python -m zeda_lightning <fit|validate|test|predict|generate|demo> ...``"""

from zeda_lightning.cli import main

if __name__ == "__main__":
    main()
