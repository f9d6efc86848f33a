"""python -m trimode.cli"""
from trimode.cli import main

main()
