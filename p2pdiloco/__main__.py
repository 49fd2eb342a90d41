from p2pdiloco.cli import main

main()
