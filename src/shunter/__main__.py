from shunter.cli import main

main()
