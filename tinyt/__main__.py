from tinyt.cli import main

main()
