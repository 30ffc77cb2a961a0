from pyvae.cli import main

main()
